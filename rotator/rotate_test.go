package rotator

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/policy"
)

func TestRotateOperator(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Hour)
		r, rec := start(t, iss, policy.RotationPolicy{Overlap: time.Minute})
		before := r.Status()
		res, err := r.Rotate(t.Context(), RotateRequest{Trigger: TriggerOperator, Actor: audit.Actor{Initiator: "uid:1000"}, Reason: "key rollover drill"})
		if err != nil {
			t.Fatal(err)
		}
		st := r.Status()
		if res.OldSerial != before.Current.Serial || res.OldVersion != 1 || res.NewVersion != 2 || res.NewSerial != st.Current.Serial {
			t.Fatalf("result = %+v, status = %+v", res, st)
		}
		if len(st.Overlap) != 1 || st.Overlap[0].Serial != res.OldSerial || st.Overlap[0].Cause != Cause(TriggerOperator) ||
			!st.Overlap[0].OverlapUntil.Equal(time.Now().Add(time.Minute)) {
			t.Fatalf("overlap = %+v, want %s for a minute", st.Overlap, res.OldSerial)
		}
		if !st.Ready || st.RenewAt.Equal(before.RenewAt) || !st.RenewAt.After(time.Now().Add(30*time.Minute)) {
			t.Fatalf("renew at %v (was %v), want the new SVID's schedule", st.RenewAt, before.RenewAt)
		}
		all := rec.all()
		last := all[len(all)-1]
		if len(all) != 2 || last.Trigger != string(TriggerOperator) || last.Initiator != "uid:1000" ||
			last.Reason != "key rollover drill" || last.Result != "ok" || last.NewSerial != res.NewSerial {
			t.Fatalf("records = %+v", all)
		}
		if _, renews := iss.counts(); renews != 1 {
			t.Fatalf("renews = %d, want the operator rotation to renew", renews)
		}
		checkStates(t, rec, 2, res.NewSerial,
			step{"", StatePreActivation, Cause(TriggerOperator)},
			step{StatePreActivation, StateActive, Cause(TriggerOperator)},
		)
		// The schedule goes on from the new SVID.
		advance(41 * time.Minute)
		if all := rec.all(); len(all) != 3 || all[2].Trigger != string(TriggerTime) || all[2].OldSerial != res.NewSerial {
			t.Fatalf("records = %+v, want a scheduled renewal of %s", all, res.NewSerial)
		}
	})
}

func TestRotateCompromised(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Hour)
		keys, drains := &keyLog{}, &drainLog{}
		r, rec := startWith(t, iss, Config{Policy: policy.RotationPolicy{Overlap: time.Minute}, Keys: keys, Drain: drains.drain})
		first := r.Status().Current.Serial
		gate := make(chan struct{})
		iss.set(func(i *issuer) { i.gate = gate })
		type outcome struct {
			res RotateResult
			err error
		}
		done := make(chan outcome, 1)
		go func() {
			res, err := r.Rotate(t.Context(), RotateRequest{Trigger: TriggerCompromise, Actor: audit.Actor{Initiator: "ca"}, Reason: "key leaked"})
			done <- outcome{res, err}
		}()
		synctest.Wait()
		// Dropped from presentation at once, before the renewal completes.
		if _, err := r.TLSCertificate(); !errors.Is(err, ErrCompromised) {
			t.Fatalf("TLSCertificate during the compromise rotation: err = %v, want ErrCompromised", err)
		}
		if err := r.Ready(); !errors.Is(err, ErrCompromised) {
			t.Fatalf("Ready = %v, want ErrCompromised", err)
		}
		if got, ok := findRetired(r.Status(), first); !ok || got.State != StateCompromised {
			t.Fatalf("status = %+v, want %s compromised", r.Status(), first)
		}
		// Its key is still needed to authenticate the renewal in flight.
		if _, n := keys.destroyedAt(keys.key(1)); n != 0 {
			t.Fatal("compromised key destroyed while it authenticated the renewal")
		}
		close(gate)
		synctest.Wait()
		out := <-done
		if out.err != nil || out.res.OldSerial != first || out.res.OldVersion != 1 {
			t.Fatalf("Rotate = %+v, %v; want the compromised serial %s", out.res, out.err, first)
		}
		st := r.Status()
		if !st.Ready || st.Current.Serial != out.res.NewSerial || len(st.Overlap) != 0 {
			t.Fatalf("status = %+v, want ready on %s and nothing in overlap", st, out.res.NewSerial)
		}
		calls := drains.all()
		if len(calls) != 1 || calls[0].serial != first || calls[0].grace != 0 {
			t.Fatalf("drains = %+v, want %s without grace", calls, first)
		}
		if _, n := keys.destroyedAt(keys.key(1)); n != 1 {
			t.Fatalf("compromised key destroyed %d times, want 1", n)
		}
		if _, renews := iss.counts(); renews != 1 {
			t.Fatalf("renews = %d, want the renewal authenticated by the compromised SVID", renews)
		}
		checkStates(t, rec, 1, first,
			step{"", StatePreActivation, Cause(TriggerEnroll)},
			step{StatePreActivation, StateActive, Cause(TriggerEnroll)},
			step{StateActive, StateCompromised, CauseCompromise},
			step{StateCompromised, StateDestroyed, CauseCompromise},
		)
		all := rec.all()
		if last := all[len(all)-1]; last.Trigger != string(TriggerCompromise) || last.Initiator != "ca" || last.OldSerial != first || last.Result != "ok" {
			t.Fatalf("rotation record = %+v", last)
		}
	})
}

func TestRotateCompromisedFailure(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Hour)
		keys := &keyLog{}
		p := policy.RotationPolicy{RetryMin: time.Second, RetryMax: 2 * time.Second}
		r, rec := startWith(t, iss, Config{Policy: p, Keys: keys})
		first := r.Status().Current.Serial
		iss.set(func(i *issuer) { i.fail = errors.New("ca unavailable") })
		res, err := r.Rotate(t.Context(), RotateRequest{Trigger: TriggerOperator, Actor: audit.Actor{Initiator: "uid:0"}, Compromised: true})
		if err == nil || res.OldSerial != first || res.NewSerial != "" {
			t.Fatalf("Rotate = %+v, %v; want an error that still names %s to revoke", res, err, first)
		}
		synctest.Wait()
		if err := r.Ready(); !errors.Is(err, ErrCompromised) {
			t.Fatalf("Ready = %v, want ErrCompromised", err)
		}
		if _, n := keys.destroyedAt(keys.key(1)); n != 1 {
			t.Fatal("compromised key kept after the failed rotation")
		}
		enrolls, renews := iss.counts()
		iss.set(func(i *issuer) { i.fail = nil })
		advance(3 * time.Second)
		if err := r.Ready(); err != nil {
			t.Fatalf("not ready once the CA came back: %v", err)
		}
		// Retries enrol: the compromised SVID no longer authenticates anything.
		if e, n := iss.counts(); e <= enrolls || n != renews {
			t.Fatalf("enrolls %d->%d renews %d->%d, want enrolments only", enrolls, e, renews, n)
		}
		all := rec.all()
		if last := all[len(all)-1]; last.Trigger != string(TriggerCompromise) || last.Initiator != initiatorRotator || last.Result != "ok" || last.OldSerial != first {
			t.Fatalf("last record = %+v, want the loop's re-enrolment after the compromise", last)
		}
		if st := r.Status(); len(st.Overlap) != 0 {
			t.Fatalf("overlap = %+v, want none", st.Overlap)
		}
	})
}

func TestRotateBadRequest(t *testing.T) {
	t.Parallel()
	iss := newIssuer(t, time.Minute)
	r, err := New(Config{ID: hostA, Issuer: iss, Bundle: iss.ca.Bundle()})
	if err != nil {
		t.Fatal(err)
	}
	for name, req := range map[string]RotateRequest{
		"unknown trigger":     {Trigger: "whim", Actor: audit.Actor{Initiator: "uid:0"}},
		"loop trigger":        {Trigger: TriggerTime, Actor: audit.Actor{Initiator: "uid:0"}},
		"no initiator":        {Trigger: TriggerOperator},
		"empty request":       {},
		"usage is the loop's": {Trigger: TriggerUsage, Actor: audit.Actor{Initiator: "uid:0"}},
	} {
		if _, err := r.Rotate(t.Context(), req); !errors.Is(err, ErrBadRequest) {
			t.Errorf("%s: err = %v, want ErrBadRequest", name, err)
		}
	}
}

func TestRotateWithoutRun(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Minute)
		r, err := New(Config{ID: hostA, Issuer: iss, Bundle: iss.ca.Bundle()})
		if err != nil {
			t.Fatal(err)
		}
		req := RotateRequest{Trigger: TriggerOperator, Actor: audit.Actor{Initiator: "uid:0"}}
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		if _, err := r.Rotate(ctx, req); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Rotate before Run: err = %v, want the deadline", err)
		}
		runCtx, stop := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- r.Run(runCtx) }()
		synctest.Wait()
		stop()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if _, err := r.Rotate(t.Context(), req); !errors.Is(err, ErrStopped) {
			t.Fatalf("Rotate after Run: err = %v, want ErrStopped", err)
		}
	})
}

func TestSetPolicy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Hour)
		r, rec := start(t, iss, policy.RotationPolicy{})
		cur := r.Status().Current
		before := r.Status().RenewAt
		if err := r.SetPolicy(policy.RotationPolicy{RenewFraction: 2}); !errors.As(err, new(*policy.FieldError)) {
			t.Fatalf("SetPolicy(invalid) = %v, want a *policy.FieldError", err)
		}
		synctest.Wait()
		if got := r.Status().RenewAt; !got.Equal(before) {
			t.Fatalf("renew at %v after a refused policy, want %v", got, before)
		}

		// Renew when 90% remains: 3-6 minutes into the hour.
		if err := r.SetPolicy(policy.RotationPolicy{RenewFraction: 0.9}); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		got := r.Status().RenewAt
		earliest, latest := cur.NotBefore.Add(3*time.Minute), cur.NotBefore.Add(6*time.Minute)
		if got.Before(earliest) || got.After(latest) {
			t.Fatalf("renew at %v, want in [%v, %v]", got, earliest, latest)
		}
		advance(time.Until(got) + time.Second)
		all := rec.all()
		if len(all) != 2 || all[1].Trigger != string(TriggerTime) || !all[1].Started.Equal(got) {
			t.Fatalf("records = %+v, want a renewal at the recomputed time %v", all, got)
		}
	})
}

func TestSetPolicyUsageAndOverlap(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Hour)
		drains := &drainLog{}
		r, rec := startWith(t, iss, Config{Drain: drains.drain})
		first := r.Status().Current.Serial
		for range 3 {
			signWith(t, r)
		}
		synctest.Wait()
		if len(rec.all()) != 1 {
			t.Fatal("rotated with the usage trigger off")
		}
		// A threshold below what the key already signed rotates at once.
		if err := r.SetPolicy(policy.RotationPolicy{MaxHandshakes: 2}); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		all := rec.all()
		if len(all) != 2 || all[1].Trigger != string(TriggerUsage) || all[1].OldSerial != first {
			t.Fatalf("records = %+v, want a usage rotation of %s", all, first)
		}
		st := r.Status()
		if len(st.Overlap) != 1 || !st.Overlap[0].OverlapUntil.Equal(st.Overlap[0].NotAfter) {
			t.Fatalf("overlap = %+v, want until NotAfter (Overlap 0)", st.Overlap)
		}
		// A shorter overlap applies to what is already in overlap, from its rotation.
		advance(10 * time.Second)
		if err := r.SetPolicy(policy.RotationPolicy{MaxHandshakes: 2, Overlap: 30 * time.Second}); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		rotated := st.Overlap[0].Since
		if o := r.Status().Overlap; len(o) != 1 || !o[0].OverlapUntil.Equal(rotated.Add(30*time.Second)) {
			t.Fatalf("overlap = %+v, want until %v", o, rotated.Add(30*time.Second))
		}
		advance(20 * time.Second)
		if calls := drains.all(); len(calls) != 1 || calls[0].serial != first || !calls[0].at.Equal(rotated.Add(30*time.Second)) {
			t.Fatalf("drains = %+v, want %s at %v", calls, first, rotated.Add(30*time.Second))
		}
	})
}

func TestSetBundle(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Hour)
		r, _ := start(t, iss, policy.RotationPolicy{})
		other := testca.New(t)
		if err := r.SetBundle(other.Bundle()); err != nil {
			t.Fatal(err)
		}
		b, err := r.GetX509BundleForTrustDomain(hostA.TrustDomain())
		if err != nil || !b.Equal(other.Bundle()) {
			t.Fatalf("bundle after SetBundle: %v", err)
		}
		// Answers from the CA that the new bundle does not anchor are refused.
		if _, err := r.Rotate(t.Context(), RotateRequest{Trigger: TriggerOperator, Actor: audit.Actor{Initiator: "test"}}); err == nil {
			t.Fatal("a certificate from a removed CA was accepted")
		}
		foreign := testca.New(t, testca.WithTrustDomain(spiffeid.RequireTrustDomainFromString("other.org")))
		for _, bad := range []*x509bundle.Bundle{nil, foreign.Bundle(), x509bundle.New(hostA.TrustDomain())} {
			if err := r.SetBundle(bad); !errors.Is(err, ErrBadRequest) {
				t.Errorf("SetBundle(%v) = %v, want ErrBadRequest", bad, err)
			}
		}
	})
}

// TestRotateAnchorCallsOnRotate: an anchor rotation is recorded with its trigger, and
// OnRotate is called once per SVID published (enrolment included), never for a
// failed attempt.
func TestRotateAnchorCallsOnRotate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Hour)
		var published atomic.Int32
		r, rec := startWith(t, iss, Config{OnRotate: func() { published.Add(1) }})
		if n := published.Load(); n != 1 {
			t.Fatalf("OnRotate called %d times after enrolment, want 1", n)
		}
		req := RotateRequest{Trigger: TriggerAnchor, Actor: audit.Actor{Initiator: "ca"}, Reason: "anchor rotation 7 activate"}
		if _, err := r.Rotate(t.Context(), req); err != nil {
			t.Fatal(err)
		}
		all := rec.all()
		if last := all[len(all)-1]; last.Trigger != string(TriggerAnchor) || last.Result != "ok" || published.Load() != 2 {
			t.Fatalf("records %+v, OnRotate %d; want an anchor rotation and 2 calls", all, published.Load())
		}
		iss.set(func(i *issuer) { i.fail = errors.New("ca down") })
		if _, err := r.Rotate(t.Context(), req); err == nil {
			t.Fatal("rotation succeeded with the CA down")
		}
		if n := published.Load(); n != 2 {
			t.Fatalf("OnRotate called %d times after a failed rotation, want 2", n)
		}
	})
}
