package rotator

import (
	"context"
	"crypto"
	"errors"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/policy"
)

func TestOverlapEnd(t *testing.T) {
	t.Parallel()
	rotated := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	notAfter := rotated.Add(20 * time.Minute)
	tests := []struct {
		name      string
		overlap   time.Duration
		want      time.Time
		wantCause Cause
	}{
		{name: "zero overlap lasts until expiry", overlap: 0, want: notAfter, wantCause: CauseExpired},
		{name: "shorter than the validity left", overlap: 5 * time.Minute, want: rotated.Add(5 * time.Minute), wantCause: CauseOverlapEnd},
		{name: "one nanosecond short of expiry", overlap: 20*time.Minute - 1, want: notAfter.Add(-1), wantCause: CauseOverlapEnd},
		{name: "ending exactly at expiry is expiry", overlap: 20 * time.Minute, want: notAfter, wantCause: CauseExpired},
		{name: "longer than the validity left is capped", overlap: 24 * time.Hour, want: notAfter, wantCause: CauseExpired},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, cause := overlapEnd(rotated, notAfter, tc.overlap)
			if !got.Equal(tc.want) || cause != tc.wantCause {
				t.Fatalf("overlapEnd = %v, %q; want %v, %q", got, cause, tc.want, tc.wantCause)
			}
		})
	}
}

func TestDrainDeadline(t *testing.T) {
	t.Parallel()
	start := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name  string
		cause Cause
		grace time.Duration
		want  time.Time
	}{
		{name: "overlap end gets the grace", cause: CauseOverlapEnd, grace: 10 * time.Second, want: start.Add(10 * time.Second)},
		{name: "expiry gets the grace", cause: CauseExpired, grace: 3 * time.Second, want: start.Add(3 * time.Second)},
		{name: "revoked gets none", cause: CauseRevoked, grace: 10 * time.Second, want: start},
		{name: "compromised gets none", cause: CauseCompromise, grace: 10 * time.Second, want: start},
		{name: "one nanosecond grace", cause: CauseOverlapEnd, grace: 1, want: start.Add(1)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := drainDeadline(start, tc.cause, tc.grace); !got.Equal(tc.want) {
				t.Fatalf("drainDeadline = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestUsageDue(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		n    uint64
		max  uint64
		want bool
	}{
		{name: "off", n: 1 << 40, max: 0, want: false},
		{name: "none yet", n: 0, max: 3, want: false},
		{name: "one short", n: 2, max: 3, want: false},
		{name: "exactly the threshold", n: 3, max: 3, want: true},
		{name: "past the threshold (threshold lowered)", n: 10, max: 3, want: true},
		{name: "threshold of one", n: 1, max: 1, want: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := usageDue(tc.n, tc.max); got != tc.want {
				t.Fatalf("usageDue(%d, %d) = %v, want %v", tc.n, tc.max, got, tc.want)
			}
		})
	}
}

func TestTriggerFor(t *testing.T) {
	t.Parallel()
	iss := newIssuer(t, time.Hour)
	now := time.Now()
	cred := func(handshakes uint64) *credential {
		c := newCredential(iss.ca.SVID(t, hostA), 1, nil)
		c.handshakes.Store(handshakes)
		return c
	}
	dropped := func(cause Cause) *credential { return cred(0).to(StateCompromised, cause, now) }
	tests := []struct {
		name     string
		s        *snapshot
		at       time.Time
		reenroll bool
		max      uint64
		want     Trigger
	}{
		{name: "nothing held", s: &snapshot{}, at: now, want: TriggerEnroll},
		{name: "revoked", s: &snapshot{dropped: dropped(CauseRevoked), dropCause: CauseRevoked}, at: now, want: TriggerRevoked},
		{name: "compromised", s: &snapshot{dropped: dropped(CauseCompromise), dropCause: CauseCompromise}, at: now, want: TriggerCompromise},
		// A destroyed SVID keeps the cause of its destruction; the drop says why it went.
		{name: "revoked after its key was destroyed", s: &snapshot{dropped: dropped(CauseExpired).to(StateDestroyed, CauseExpired, now), dropCause: CauseRevoked}, at: now, want: TriggerRevoked},
		{name: "current expired", s: &snapshot{current: cred(0)}, at: now.Add(2 * time.Hour), want: TriggerExpired},
		{name: "expiry beats usage", s: &snapshot{current: cred(5)}, at: now.Add(2 * time.Hour), max: 5, want: TriggerExpired},
		{name: "renewal refused for good", s: &snapshot{current: cred(0)}, at: now, reenroll: true, want: TriggerReject},
		{name: "usage threshold reached", s: &snapshot{current: cred(5)}, at: now, max: 5, want: TriggerUsage},
		{name: "usage one short", s: &snapshot{current: cred(4)}, at: now, max: 5, want: TriggerTime},
		{name: "usage off", s: &snapshot{current: cred(1 << 30)}, at: now, max: 0, want: TriggerTime},
		{name: "schedule", s: &snapshot{current: cred(0)}, at: now, want: TriggerTime},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := triggerFor(tc.s, tc.at, tc.reenroll, tc.max); got != tc.want {
				t.Fatalf("triggerFor = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestPruneRetired(t *testing.T) {
	t.Parallel()
	iss := newIssuer(t, time.Hour)
	now := time.Now()
	mk := func(state audit.KeyPhase) *credential {
		return newCredential(iss.ca.SVID(t, hostA), 1, nil).to(state, "x", now)
	}
	tests := []struct {
		name      string
		retiring  int // credentials still being drained, listed first
		destroyed int
		wantKept  int
	}{
		{name: "nothing", wantKept: 0},
		{name: "under the limit", retiring: 2, destroyed: keepDestroyed - 1, wantKept: 2 + keepDestroyed - 1},
		{name: "at the limit", destroyed: keepDestroyed, wantKept: keepDestroyed},
		{name: "over the limit keeps the newest", retiring: 1, destroyed: keepDestroyed + 3, wantKept: 1 + keepDestroyed},
		{name: "retiring ones are never dropped", retiring: keepDestroyed + 2, destroyed: 1, wantKept: keepDestroyed + 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var in []*credential
			for range tc.retiring {
				in = append(in, mk(StateOverlap))
			}
			for range tc.destroyed {
				in = append(in, mk(StateDestroyed))
			}
			got := pruneRetired(in)
			if len(got) != tc.wantKept || !slices.Equal(got, in[:tc.wantKept]) {
				t.Fatalf("kept %d, want the first %d of %d", len(got), tc.wantKept, len(in))
			}
		})
	}
}

// keyLog is a KeyStore over MemoryKeys that remembers every key made and destroyed.
type keyLog struct {
	mu        sync.Mutex
	made      []crypto.Signer
	destroyed []destroyCall
}

type destroyCall struct {
	key crypto.Signer
	at  time.Time
}

func (k *keyLog) NewKey(ctx context.Context) (crypto.Signer, error) {
	key, err := MemoryKeys{}.NewKey(ctx)
	if err == nil {
		k.mu.Lock()
		k.made = append(k.made, key)
		k.mu.Unlock()
	}
	return key, err
}

func (k *keyLog) Destroy(ctx context.Context, key crypto.Signer) error {
	k.mu.Lock()
	k.destroyed = append(k.destroyed, destroyCall{key: key, at: time.Now()})
	k.mu.Unlock()
	return MemoryKeys{}.Destroy(ctx, key)
}

// key returns the key of version v (keys are made in version order).
func (k *keyLog) key(v uint64) crypto.Signer {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.made[v-1]
}

// destroyedAt returns when key was destroyed and how many times.
func (k *keyLog) destroyedAt(key crypto.Signer) (time.Time, int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var at time.Time
	n := 0
	for _, d := range k.destroyed {
		if d.key == key {
			at, n = d.at, n+1
		}
	}
	return at, n
}

// drainLog is a Config.Drain that waits out the grace (or ctx) like the proxy does
// and remembers each call.
type drainLog struct {
	mu    sync.Mutex
	calls []drainCall
	hold  chan struct{} // while set, each call also waits for it to close
}

type drainCall struct {
	serial    string
	grace     time.Duration
	at, until time.Time
}

func (d *drainLog) drain(ctx context.Context, serial string, grace time.Duration) int {
	d.mu.Lock()
	i := len(d.calls)
	d.calls = append(d.calls, drainCall{serial: serial, grace: grace, at: time.Now()})
	hold := d.hold
	d.mu.Unlock()
	select {
	case <-time.After(grace):
	case <-ctx.Done():
	}
	if hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
		}
	}
	d.mu.Lock()
	d.calls[i].until = time.Now()
	d.mu.Unlock()
	return 2
}

func (d *drainLog) all() []drainCall {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.calls)
}

// step is one expected key_state record.
type step struct {
	from, to audit.KeyPhase
	cause    Cause
}

func checkStates(t *testing.T, rec *records, version uint64, serial string, want ...step) {
	t.Helper()
	got := rec.keyStates(version)
	var gotSteps []step
	for _, k := range got {
		gotSteps = append(gotSteps, step{k.From, k.To, Cause(k.Cause)})
	}
	if !slices.Equal(gotSteps, want) {
		t.Fatalf("key_state records of version %d = %v, want %v", version, gotSteps, want)
	}
	for _, k := range got {
		if k.Key != "svid" || k.SPIFFEID != hostA.String() {
			t.Fatalf("record %+v: want key svid of %s", k, hostA)
		}
		// A serial exists once the key is certified; a key that never was has none.
		if k.To != StatePreActivation && serial != "" && k.Serial != serial {
			t.Fatalf("record %+v: serial %q, want %q", k, k.Serial, serial)
		}
	}
}

func findRetired(st Status, serial string) (CredentialStatus, bool) {
	i := slices.IndexFunc(st.Retired, func(c CredentialStatus) bool { return c.Serial == serial })
	if i < 0 {
		return CredentialStatus{}, false
	}
	return st.Retired[i], true
}

func TestOverlapEndDrainsThenDestroys(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Minute)
		keys, drains := &keyLog{}, &drainLog{}
		p := policy.RotationPolicy{Overlap: 5 * time.Second, DrainGrace: 3 * time.Second, JitterFraction: 1e-9}
		r, rec := startWith(t, iss, Config{Policy: p, Keys: keys, Drain: drains.drain})
		first := r.Status().Current.Serial
		advance(41 * time.Second) // renewed at 40 s
		st := r.Status()
		if len(st.Overlap) != 1 || st.Overlap[0].Serial != first || st.Overlap[0].State != StateOverlap {
			t.Fatalf("overlap = %+v, want %s in state overlap", st.Overlap, first)
		}
		overlapUntil := st.Overlap[0].OverlapUntil
		if len(drains.all()) != 0 {
			t.Fatalf("drained during the overlap: %+v", drains.all())
		}

		advance(5 * time.Second) // overlap ended at 45 s; the drain's grace runs to 48 s
		calls := drains.all()
		if len(calls) != 1 || calls[0].serial != first || calls[0].grace != 3*time.Second || !calls[0].at.Equal(overlapUntil) {
			t.Fatalf("drains = %+v, want %s with grace 3s at %v", calls, first, overlapUntil)
		}
		if _, n := keys.destroyedAt(keys.key(1)); n != 0 {
			t.Fatal("key destroyed before its drain ended")
		}
		st = r.Status()
		got, ok := findRetired(st, first)
		if len(st.Overlap) != 0 || !ok || got.State != StateOverlap || !got.DrainBy.Equal(overlapUntil.Add(3*time.Second)) {
			t.Fatalf("status while draining = %+v, want %s retired, still in overlap, drained by %v", st, first, overlapUntil.Add(3*time.Second))
		}
		// The loop is not held up by the drain: an operator rotation completes meanwhile.
		res, err := r.Rotate(t.Context(), RotateRequest{Trigger: TriggerOperator, Actor: audit.Actor{Initiator: "uid:0"}})
		if err != nil || res.NewVersion != 3 {
			t.Fatalf("Rotate during a drain = %+v, %v; want version 3", res, err)
		}

		advance(3 * time.Second)
		at, n := keys.destroyedAt(keys.key(1))
		if n != 1 || !at.Equal(overlapUntil.Add(3*time.Second)) {
			t.Fatalf("key 1 destroyed %d times, at %v; want once at the end of the drain %v", n, at, overlapUntil.Add(3*time.Second))
		}
		if _, err := keys.key(1).Sign(nil, make([]byte, 32), crypto.SHA256); !errors.Is(err, ErrKeyDestroyed) {
			t.Fatalf("signing with the destroyed key: err = %v, want ErrKeyDestroyed", err)
		}
		if got, ok := findRetired(r.Status(), first); !ok || got.State != StateDestroyed || got.Cause != CauseOverlapEnd {
			t.Fatalf("retired entry = %+v, want destroyed for overlap_end", got)
		}
		checkStates(t, rec, 1, first,
			step{"", StatePreActivation, Cause(TriggerEnroll)},
			step{StatePreActivation, StateActive, Cause(TriggerEnroll)},
			step{StateActive, StateOverlap, Cause(TriggerTime)},
			step{StateOverlap, StateDestroyed, CauseOverlapEnd},
		)
		// The second key went to overlap when the operator rotated, and its overlap
		// (5 s) and drain (3 s) have not ended yet.
		second := res.OldSerial
		checkStates(t, rec, 2, second,
			step{"", StatePreActivation, Cause(TriggerTime)},
			step{StatePreActivation, StateActive, Cause(TriggerTime)},
			step{StateActive, StateOverlap, Cause(TriggerOperator)},
		)
		if _, n := keys.destroyedAt(keys.key(2)); n != 0 {
			t.Fatal("key 2 destroyed during its overlap")
		}
	})
}

func TestOverlapZeroEndsAtExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Minute)
		keys, drains := &keyLog{}, &drainLog{}
		r, rec := startWith(t, iss, Config{Keys: keys, Drain: drains.drain})
		first := r.Status().Current
		advance(45 * time.Second) // renewed at 37-40 s; overlap until the first NotAfter
		if o := r.Status().Overlap; len(o) != 1 || !o[0].OverlapUntil.Equal(first.NotAfter) {
			t.Fatalf("overlap = %+v, want until %v", o, first.NotAfter)
		}
		advance(time.Until(first.NotAfter) + policy.DefaultDrainGrace + time.Second)
		calls := drains.all()
		if len(calls) != 1 || calls[0].serial != first.Serial || calls[0].grace != policy.DefaultDrainGrace || !calls[0].at.Equal(first.NotAfter) {
			t.Fatalf("drains = %+v, want %s at its NotAfter with the default grace", calls, first.Serial)
		}
		checkStates(t, rec, 1, first.Serial,
			step{"", StatePreActivation, Cause(TriggerEnroll)},
			step{StatePreActivation, StateActive, Cause(TriggerEnroll)},
			step{StateActive, StateOverlap, Cause(TriggerTime)},
			step{StateOverlap, StateDestroyed, CauseExpired},
		)
	})
}

func TestExpiredCurrentDrained(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Minute)
		keys, drains := &keyLog{}, &drainLog{}
		p := policy.RotationPolicy{DrainGrace: 2 * time.Second, RetryMin: time.Second, RetryMax: 5 * time.Second}
		r, rec := startWith(t, iss, Config{Policy: p, Keys: keys, Drain: drains.drain})
		first := r.Status().Current
		iss.set(func(i *issuer) { i.fail = errors.New("ca unavailable") })
		advance(time.Until(first.NotAfter) + 3*time.Second)
		calls := drains.all()
		if len(calls) != 1 || calls[0].serial != first.Serial || calls[0].grace != 2*time.Second ||
			calls[0].at.Sub(first.NotAfter) > time.Millisecond {
			t.Fatalf("drains = %+v, want %s drained at its expiry %v", calls, first.Serial, first.NotAfter)
		}
		st := r.Status()
		if st.Ready || st.Current == nil || st.Current.State != StateDestroyed {
			t.Fatalf("status = %+v, want the expired SVID held, not ready, its key destroyed", st)
		}
		if _, n := keys.destroyedAt(keys.key(1)); n != 1 {
			t.Fatalf("expired key destroyed %d times, want 1", n)
		}
		checkStates(t, rec, 1, first.Serial,
			step{"", StatePreActivation, Cause(TriggerEnroll)},
			step{StatePreActivation, StateActive, Cause(TriggerEnroll)},
			step{StateActive, StateDestroyed, CauseExpired},
		)
		// Revoking it now only stops holding it: a destroyed key has no later state.
		if n := r.Revoke(bySerial(first.Serial)); n != 1 {
			t.Fatalf("Revoke dropped %d, want 1", n)
		}
		if err := r.Ready(); !errors.Is(err, ErrRevoked) {
			t.Fatalf("Ready after Revoke = %v, want ErrRevoked", err)
		}
		if st := r.Status(); !st.Revoked || st.RevokedSerial != first.Serial {
			t.Fatalf("status = %+v, want revoked %s", st, first.Serial)
		}
		checkStates(t, rec, 1, first.Serial,
			step{"", StatePreActivation, Cause(TriggerEnroll)},
			step{StatePreActivation, StateActive, Cause(TriggerEnroll)},
			step{StateActive, StateDestroyed, CauseExpired},
		)
		// Once the CA is back the re-enrolment supersedes it without a second drain.
		iss.set(func(i *issuer) { i.fail = nil })
		advance(6 * time.Second)
		if err := r.Ready(); err != nil {
			t.Fatalf("not ready after the CA came back: %v", err)
		}
		if len(drains.all()) != 1 {
			t.Fatalf("drains = %+v, want the one", drains.all())
		}
		all := rec.all()
		if last := all[len(all)-1]; last.Trigger != string(TriggerRevoked) || last.Result != "ok" || last.OldSerial != first.Serial {
			t.Fatalf("last record = %+v, want the re-enrolment after the revocation", last)
		}
		if got, ok := findRetired(r.Status(), first.Serial); !ok || got.State != StateDestroyed {
			t.Fatalf("retired = %+v, want %s listed destroyed", r.Status().Retired, first.Serial)
		}
	})
}

func TestFailedAttemptKeyDestroyed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Minute)
		keys := &keyLog{}
		p := policy.RotationPolicy{RetryMin: time.Minute, RetryMax: time.Minute} // one attempt in the window
		r, rec := startWith(t, iss, Config{Policy: p, Keys: keys})
		iss.set(func(i *issuer) { i.fail = errors.New("ca unavailable") })
		advance(41 * time.Second)
		if _, renews := iss.counts(); renews == 0 {
			t.Fatal("no renewal attempted")
		}
		checkStates(t, rec, 2, "",
			step{"", StatePreActivation, Cause(TriggerTime)},
			step{StatePreActivation, StateDestroyed, CauseFailed},
		)
		if _, n := keys.destroyedAt(keys.key(2)); n != 1 {
			t.Fatalf("failed attempt's key destroyed %d times, want 1", n)
		}
		if st := r.Status(); st.Current.Version != 1 || st.Current.State != StateActive {
			t.Fatalf("current = %+v, want version 1 still active", st.Current)
		}
	})
}

func TestRunWaitsForDrains(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Minute)
		keys := &keyLog{}
		drains := &drainLog{hold: make(chan struct{})} // a drain that only ctx ends
		r, err := New(Config{ID: hostA, Issuer: iss, Bundle: iss.ca.Bundle(), Keys: keys, Drain: drains.drain,
			Policy: policy.RotationPolicy{Overlap: time.Second, DrainGrace: time.Nanosecond}})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- r.Run(ctx) }()
		advance(42 * time.Second) // renewed at ~40 s, overlap ended a second later
		if len(drains.all()) != 1 {
			t.Fatalf("drains = %+v, want one in progress", drains.all())
		}
		select {
		case err := <-done:
			t.Fatalf("Run returned %v before it was cancelled", err)
		default:
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		// Run returned only after the drain ended and the key was destroyed.
		if c := drains.all(); c[0].until.IsZero() {
			t.Fatal("Run returned while a drain was running")
		}
		if _, n := keys.destroyedAt(keys.key(1)); n != 1 {
			t.Fatalf("key destroyed %d times by shutdown, want 1", n)
		}
	})
}
