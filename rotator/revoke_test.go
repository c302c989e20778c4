package rotator

import (
	"errors"
	"math/big"
	"math/rand/v2"
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/policy"
)

// revokedErr is how the CA refuses a revoked identity: for good.
type revokedErr struct{}

func (revokedErr) Error() string   { return "identity revoked" }
func (revokedErr) Permanent() bool { return true }

func bySerial(serial string) func(spiffeid.ID, string, time.Time) bool {
	return func(_ spiffeid.ID, s string, _ time.Time) bool { return s == serial }
}

func byID(id spiffeid.ID) func(spiffeid.ID, string, time.Time) bool {
	return func(got spiffeid.ID, _ string, _ time.Time) bool { return got == id }
}

// presented returns the serial TLSCertificate hands out, or "" with its error.
func presented(r *Rotator) (string, error) {
	c, err := r.TLSCertificate()
	if err != nil {
		return "", err
	}
	return c.Leaf.SerialNumber.String(), nil
}

func TestRevokeCurrentReenrolsAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Hour)
		r, rec := start(t, iss, policy.RotationPolicy{})
		first := r.Status().Current.Serial
		// Hold the re-enrolment in the issuer to look at the state in between.
		gate := make(chan struct{})
		iss.set(func(i *issuer) { i.gate = gate })
		revokedAt := time.Now()
		if n := r.Revoke(bySerial(first)); n != 1 {
			t.Fatalf("Revoke dropped %d SVIDs, want 1", n)
		}
		// Nothing is presented from the moment Revoke returns, whatever the loop does.
		if _, err := r.TLSCertificate(); !errors.Is(err, ErrRevoked) {
			t.Fatalf("TLSCertificate after Revoke: err = %v, want ErrRevoked", err)
		}
		if _, err := r.GetX509SVID(); !errors.Is(err, ErrRevoked) {
			t.Fatalf("GetX509SVID after Revoke: err = %v, want ErrRevoked", err)
		}
		if err := r.Ready(); !errors.Is(err, ErrRevoked) {
			t.Fatalf("Ready after Revoke = %v, want ErrRevoked", err)
		}
		synctest.Wait()
		// The loop was asleep until the renewal time, ~40 min away: it must have been
		// woken, not have waited for a timer.
		if enrolls, renews := iss.counts(); enrolls != 2 || renews != 0 || !time.Now().Equal(revokedAt) {
			t.Fatalf("enrolls=%d renews=%d %v after Revoke, want a re-enrolment at once", enrolls, renews, time.Since(revokedAt))
		}
		st := r.Status()
		if st.Ready || !st.Revoked || st.RevokedSerial != first || st.Current != nil || len(st.Overlap) != 0 {
			t.Fatalf("status while re-enrolling = %+v, want revoked %s and nothing held", st, first)
		}

		close(gate)
		synctest.Wait()
		if err := r.Ready(); err != nil {
			t.Fatalf("not ready after re-enrolment: %v", err)
		}
		st = r.Status()
		if !st.Ready || st.Revoked || st.RevokedSerial != "" || st.Current == nil || st.Current.Serial == first {
			t.Fatalf("status after re-enrolment = %+v, want ready with a new serial", st)
		}
		// A revoked SVID is not superseded: it must not come back as an overlap entry.
		if len(st.Overlap) != 0 {
			t.Fatalf("overlap after re-enrolment = %+v, want none", st.Overlap)
		}
		if got, err := presented(r); err != nil || got != st.Current.Serial {
			t.Fatalf("presented %q, %v; want %s", got, err, st.Current.Serial)
		}
		all := rec.all()
		last := all[len(all)-1]
		if len(all) != 2 || last.Trigger != string(TriggerRevoked) || last.Result != "ok" ||
			last.OldSerial != first || last.NewSerial != st.Current.Serial {
			t.Fatalf("audit = %+v, want the enrolment then a re-enrolment from %s", all, first)
		}
	})
}

func TestRevokeRefusedBacksOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, 24*time.Hour) // no renewal due within the test
		p := policy.RotationPolicy{RetryMin: time.Second, RetryMax: time.Minute}
		r, rec := startWith(t, iss, Config{Policy: p, Rand: rand.New(rand.NewPCG(1, 2))})
		first := r.Status().Current.Serial
		iss.set(func(i *issuer) { i.fail = revokedErr{} })
		if n := r.Revoke(byID(hostA)); n != 1 {
			t.Fatalf("Revoke dropped %d SVIDs, want 1", n)
		}
		synctest.Wait()
		if enrolls, _ := iss.counts(); enrolls != 2 {
			t.Fatalf("enrolls = %d right after Revoke, want a first re-enrolment at once", enrolls)
		}
		for range 60 {
			advance(time.Minute)
			if err := r.Ready(); !errors.Is(err, ErrRevoked) {
				t.Fatalf("Ready at %v = %v, want ErrRevoked", time.Now(), err)
			}
		}
		enrolls, renews := iss.counts()
		attempts := enrolls - 1
		t.Logf("%d enrolment attempts in the hour after revocation", attempts)
		// Every wait is under RetryMax, so at least 60 attempts fit in the hour; with full
		// jitter a wait averages RetryMax/2 once capped, so about 120. A loop that spins
		// on a permanent refusal would make thousands.
		if attempts < 60 || attempts > 180 {
			t.Fatalf("%d enrolment attempts in an hour with RetryMax %v, want 60-180", attempts, p.RetryMax)
		}
		// The revoked SVID must never be used to authenticate a renewal.
		if renews != 0 {
			t.Fatalf("renews = %d after Revoke, want 0", renews)
		}
		if st := r.Status(); st.Attempts != attempts || !st.Revoked || st.RevokedSerial != first || st.Ready {
			t.Fatalf("status = %+v, want revoked %s with %d failed attempts", st, first, attempts)
		}
		after := rec.all()[1:]
		if len(after) != attempts {
			t.Fatalf("%d audit records for %d attempts", len(after), attempts)
		}
		for i, a := range after {
			if a.Trigger != string(TriggerRevoked) || a.Result != "error" || a.OldSerial != first || a.Reason == "" {
				t.Fatalf("record %d = %+v, want a refused re-enrolment from %s", i, a, first)
			}
		}

		// A CA that issues for the revoked identity anyway is not believed: the rotator
		// keeps the deny predicate it was given.
		iss.set(func(i *issuer) { i.fail = nil })
		advance(2 * time.Minute)
		if err := r.Ready(); !errors.Is(err, ErrRevoked) {
			t.Fatalf("Ready after the CA issued for a revoked identity = %v, want ErrRevoked", err)
		}
		if enrolls2, _ := iss.counts(); enrolls2 <= enrolls {
			t.Fatal("no enrolment attempted once the CA answered")
		}
	})
}

func TestRevokeDuringRenewal(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Minute)
		r, rec := start(t, iss, policy.RotationPolicy{Overlap: 15 * time.Second})
		first := r.Status().Current.Serial
		gate := make(chan struct{})
		iss.set(func(i *issuer) { i.gate = gate })
		advance(41 * time.Second) // renewal began at 37-40 s and is held in the issuer
		if _, renews := iss.counts(); renews != 1 {
			t.Fatalf("renews = %d, want one in flight", renews)
		}
		if n := r.Revoke(bySerial(first)); n != 1 {
			t.Fatalf("Revoke dropped %d SVIDs, want 1", n)
		}
		if err := r.Ready(); !errors.Is(err, ErrRevoked) {
			t.Fatalf("Ready = %v, want ErrRevoked", err)
		}
		// The CA answers the renewal (it had not applied the revocation yet): the answer
		// was authenticated by a revoked SVID and must be refused; the loop re-enrols.
		close(gate)
		synctest.Wait()
		all := rec.all()
		if len(all) != 3 {
			t.Fatalf("audit = %+v, want enrolment, refused renewal, re-enrolment", all)
		}
		if renewal := all[1]; renewal.Trigger != string(TriggerTime) || renewal.Result != "error" || renewal.NewSerial != "" {
			t.Fatalf("renewal record = %+v, want refused", renewal)
		}
		reenrol := all[2]
		if reenrol.Trigger != string(TriggerRevoked) || reenrol.Result != "ok" || reenrol.OldSerial != first {
			t.Fatalf("re-enrolment record = %+v", reenrol)
		}
		st := r.Status()
		if !st.Ready || st.Revoked || st.Current.Serial != reenrol.NewSerial || len(st.Overlap) != 0 {
			t.Fatalf("status = %+v, want ready on the re-enrolled SVID %s and nothing in overlap", st, reenrol.NewSerial)
		}
		if enrolls, _ := iss.counts(); enrolls != 2 {
			t.Fatalf("enrolls = %d, want 2", enrolls)
		}
	})
}

func TestRevokeOverlapEntry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Minute)
		p := policy.RotationPolicy{Overlap: 15 * time.Second, RetryMin: time.Second, RetryMax: 2 * time.Second}
		r, rec := start(t, iss, p)
		first := r.Status().Current.Serial
		advance(41 * time.Second)
		st := r.Status()
		if len(st.Overlap) != 1 || st.Overlap[0].Serial != first {
			t.Fatalf("overlap = %+v, want %s", st.Overlap, first)
		}
		second := st.Current.Serial
		enrolls, renews := iss.counts()
		if n := r.Revoke(bySerial(first)); n != 1 {
			t.Fatalf("Revoke dropped %d SVIDs, want 1", n)
		}
		synctest.Wait()
		st = r.Status()
		if !st.Ready || st.Revoked || st.Current.Serial != second || len(st.Overlap) != 0 {
			t.Fatalf("status = %+v, want %s current and nothing in overlap", st, second)
		}
		// Dropping an overlap entry asks nothing of the CA.
		if e, n := iss.counts(); e != enrolls || n != renews {
			t.Fatalf("calls went from %d/%d to %d/%d enrolls/renews", enrolls, renews, e, n)
		}

		// A CA that hands the revoked serial out again is not believed: it is never
		// presented, held or put back in overlap, through renewal, expiry and
		// re-enrolment.
		serial, _ := new(big.Int).SetString(first, 10)
		iss.set(func(i *issuer) { i.serial = serial })
		records := len(rec.all())
		for range 90 {
			advance(time.Second)
			if got, _ := presented(r); got == first {
				t.Fatalf("revoked serial %s presented at %v", first, time.Now())
			}
			st := r.Status()
			if st.Current != nil && st.Current.Serial == first ||
				slices.ContainsFunc(st.Overlap, func(c CredentialStatus) bool { return c.Serial == first }) {
				t.Fatalf("revoked serial %s held at %v: %+v", first, time.Now(), st)
			}
		}
		refused := rec.all()[records:]
		if len(refused) == 0 || slices.ContainsFunc(refused, func(a *audit.Rotation) bool { return a.Result != "error" }) {
			t.Fatalf("records while the CA reissued the revoked serial = %+v, want only refusals", refused)
		}
		iss.set(func(i *issuer) { i.serial = nil })
		advance(3 * time.Second)
		if err := r.Ready(); err != nil {
			t.Fatalf("not ready once the CA issued a fresh serial: %v", err)
		}
	})
}

func TestRevokeUnrelated(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Minute)
		r, rec := start(t, iss, policy.RotationPolicy{})
		before := r.Status()
		other := spiffeid.RequireFromString("spiffe://example.org/host/b")
		for name, denied := range map[string]func(spiffeid.ID, string, time.Time) bool{
			"other serial": bySerial("12345"),
			"other id":     byID(other),
			"nil":          nil,
		} {
			if n := r.Revoke(denied); n != 0 {
				t.Fatalf("Revoke(%s) dropped %d SVIDs, want 0", name, n)
			}
		}
		synctest.Wait()
		st := r.Status()
		if !st.Ready || st.Revoked || st.Current.Serial != before.Current.Serial || !st.RenewAt.Equal(before.RenewAt) {
			t.Fatalf("status = %+v, want it unchanged from %+v", st, before)
		}
		if enrolls, renews := iss.counts(); enrolls != 1 || renews != 0 || len(rec.all()) != 1 {
			t.Fatalf("enrolls=%d renews=%d records=%d, want nothing after the first enrolment", enrolls, renews, len(rec.all()))
		}
	})
}

func TestRevokeBeforeEnrolment(t *testing.T) {
	t.Parallel()
	iss := newIssuer(t, time.Minute)
	r, err := New(Config{ID: hostA, Issuer: iss, Bundle: iss.ca.Bundle()})
	if err != nil {
		t.Fatal(err)
	}
	if n := r.Revoke(byID(hostA)); n != 0 {
		t.Fatalf("Revoke with nothing held dropped %d", n)
	}
	if err := r.Ready(); !errors.Is(err, ErrNoSVID) {
		t.Fatalf("Ready = %v, want ErrNoSVID", err)
	}
	if st := r.Status(); st.Revoked {
		t.Fatalf("status = %+v, want not revoked", st)
	}
}

func TestRevokeDrainsAndDestroys(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Minute)
		keys, drains := &keyLog{}, &drainLog{}
		p := policy.RotationPolicy{Overlap: 10 * time.Second, DrainGrace: 20 * time.Second}
		r, rec := startWith(t, iss, Config{Policy: p, Keys: keys, Drain: drains.drain})
		first := r.Status().Current.Serial
		advance(41 * time.Second)
		second := r.Status().Current.Serial
		advance(10 * time.Second) // the first SVID's overlap ended: draining for 20 s
		if calls := drains.all(); len(calls) != 1 || calls[0].grace != 20*time.Second {
			t.Fatalf("drains = %+v, want the first SVID's", calls)
		}

		// Revoke the current one and the one being drained.
		revokedAt := time.Now()
		if n := r.Revoke(func(_ spiffeid.ID, s string, _ time.Time) bool { return s == first || s == second }); n != 1 {
			t.Fatalf("Revoke dropped %d, want 1 (the one being drained is no longer held)", n)
		}
		synctest.Wait()
		calls := drains.all()
		want := map[string]bool{first: true, second: true}
		for _, c := range calls[1:] {
			if c.grace != 0 || !c.at.Equal(revokedAt) || !want[c.serial] {
				t.Fatalf("drain %+v, want %v without grace at once", c, want)
			}
			delete(want, c.serial)
		}
		if len(want) != 0 {
			t.Fatalf("drains = %+v, missing %v", calls, want)
		}
		// The current one's key is destroyed at once; the first's by its own job once
		// its drain returns, and only once.
		if at, n := keys.destroyedAt(keys.key(2)); n != 1 || !at.Equal(revokedAt) {
			t.Fatalf("revoked key destroyed %d times at %v, want once at %v", n, at, revokedAt)
		}
		advance(20 * time.Second)
		if _, n := keys.destroyedAt(keys.key(1)); n != 1 {
			t.Fatalf("first key destroyed %d times, want 1", n)
		}
		checkStates(t, rec, 2, second,
			step{"", StatePreActivation, Cause(TriggerTime)},
			step{StatePreActivation, StateActive, Cause(TriggerTime)},
			step{StateActive, StateCompromised, CauseRevoked},
			step{StateCompromised, StateDestroyed, CauseRevoked},
		)
		checkStates(t, rec, 1, first,
			step{"", StatePreActivation, Cause(TriggerEnroll)},
			step{StatePreActivation, StateActive, Cause(TriggerEnroll)},
			step{StateActive, StateOverlap, Cause(TriggerTime)},
			step{StateOverlap, StateCompromised, CauseRevoked},
			step{StateCompromised, StateDestroyed, CauseRevoked},
		)
	})
}
