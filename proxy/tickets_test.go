package proxy

import (
	"crypto/x509"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/audit"
)

// TestTicketKeySchedule walks the key schedule through checks at chosen
// times: a new key once the newest is a period old, each key alive for two
// periods, never more than two keys, and a late check (no rotation for a
// long time) dropping everything that is past its bound; every check emits
// exactly the state transitions it made, in order.
func TestTicketKeySchedule(t *testing.T) {
	t.Parallel()
	const p = time.Hour
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	type step struct {
		at        time.Duration // since t0
		keys      int           // live keys after the check
		rotations int           // period rotations so far
		newest    time.Duration // creation of the newest key, since t0
		records   []string      // key_state records the check emitted
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{name: "within_first_period", steps: []step{
			{at: 0, keys: 1}, {at: 59 * time.Minute, keys: 1},
		}},
		{name: "one_period", steps: []step{
			{at: p, keys: 2, rotations: 1, newest: p, records: []string{
				"v2 ->active schedule", "v1 active->overlap schedule",
			}},
			{at: p + 30*time.Minute, keys: 2, rotations: 1, newest: p},
		}},
		{name: "steady_rotation", steps: []step{
			{at: p, keys: 2, rotations: 1, newest: p, records: []string{
				"v2 ->active schedule", "v1 active->overlap schedule",
			}},
			{at: 2 * p, keys: 2, rotations: 2, newest: 2 * p, records: []string{
				"v3 ->active schedule", "v2 active->overlap schedule", "v1 overlap->destroyed schedule",
			}},
			{at: 3 * p, keys: 2, rotations: 3, newest: 3 * p, records: []string{
				"v4 ->active schedule", "v3 active->overlap schedule", "v2 overlap->destroyed schedule",
			}},
		}},
		{name: "late_check_drops_both", steps: []step{
			// The first key is two periods old: it neither encrypts nor
			// decrypts, and is replaced outright, skipping overlap.
			{at: 2 * p, keys: 1, rotations: 1, newest: 2 * p, records: []string{
				"v2 ->active schedule", "v1 active->destroyed schedule",
			}},
		}},
		{name: "late_check_keeps_previous_within_bound", steps: []step{
			{at: p, keys: 2, rotations: 1, newest: p, records: []string{
				"v2 ->active schedule", "v1 active->overlap schedule",
			}},
			// Key 1 (t0) is dead, key 2 (p) may still decrypt until 3p.
			{at: 2*p + 30*time.Minute, keys: 2, rotations: 2, newest: 2*p + 30*time.Minute, records: []string{
				"v3 ->active schedule", "v2 active->overlap schedule", "v1 overlap->destroyed schedule",
			}},
		}},
		{name: "overlap_ends_before_next_rotation", steps: []step{
			// A late rotation: key 2 still has half a period to encrypt
			// when key 1 reaches two periods.
			{at: p + p/2, keys: 2, rotations: 1, newest: p + p/2, records: []string{
				"v2 ->active schedule", "v1 active->overlap schedule",
			}},
			{at: 2 * p, keys: 1, rotations: 1, newest: p + p/2, records: []string{
				"v1 overlap->destroyed schedule",
			}},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rotations := 0
			var records []string
			k, err := newTicketKeys(t0, func(trigger string) {
				if trigger == triggerPeriod {
					rotations++
				}
			}, func(r audit.KeyState) { records = append(records, recordString(r)) })
			if err != nil {
				t.Fatal(err)
			}
			k.flush()
			if want := []string{"v1 ->active schedule"}; !slices.Equal(records, want) {
				t.Fatalf("records of the first key %q, want %q", records, want)
			}
			for _, s := range tc.steps {
				now := t0.Add(s.at)
				records = nil
				k.check(now, p)
				if !slices.Equal(records, s.records) {
					t.Fatalf("at %s: records %q, want %q", s.at, records, s.records)
				}
				created := *k.view.Load()
				if len(created) != s.keys || rotations != s.rotations || !created[0].Equal(t0.Add(s.newest)) {
					t.Fatalf("at %s: keys created %v, %d rotations; want %d keys, %d rotations, newest at %s",
						s.at, created, rotations, s.keys, s.rotations, s.newest)
				}
				for _, c := range created {
					if !live(c, now, p) {
						t.Fatalf("at %s: key created %s is past two periods but still installed", s.at, c)
					}
				}
				if wait := k.next(now, p); wait <= 0 || wait > p {
					t.Fatalf("at %s: next check in %s, want within (0, %s]", s.at, wait, p)
				}
			}
		})
	}
}

// TestTicketKeyReset: a reset destroys and zeroes every held key, then
// activates a new one, with the reset's cause in the records and the
// trigger; status shows the new key alone.
func TestTicketKeyReset(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var triggers, records []string
	k, err := newTicketKeys(t0, func(trigger string) { triggers = append(triggers, trigger) },
		func(r audit.KeyState) { records = append(records, recordString(r)) })
	if err != nil {
		t.Fatal(err)
	}
	k.check(t0.Add(time.Hour), time.Hour)
	old := append([]*ticketKey(nil), k.keys...)
	records = nil
	if err := k.reset(t0.Add(90*time.Minute), causeCompromise); err != nil {
		t.Fatal(err)
	}
	if len(k.keys) != 1 || !k.keys[0].created.Equal(t0.Add(90*time.Minute)) {
		t.Fatalf("keys after reset: %+v", k.keys)
	}
	for _, o := range old {
		if o.key != [32]byte{} {
			t.Fatal("a replaced key was not zeroed")
		}
	}
	if want := []string{triggerPeriod, causeCompromise}; !slices.Equal(triggers, want) {
		t.Fatalf("triggers %v, want %v", triggers, want)
	}
	want := []string{"v2 active->destroyed compromise", "v1 overlap->destroyed compromise", "v3 ->active compromise"}
	if !slices.Equal(records, want) {
		t.Fatalf("records %q, want %q", records, want)
	}
	st := k.status(time.Hour)
	if len(st) != 1 || st[0].Version != 3 || st[0].State != "active" || !st[0].Created.Equal(t0.Add(90*time.Minute)) ||
		!st[0].EncryptUntil.Equal(t0.Add(150*time.Minute)) || !st[0].DecryptUntil.Equal(t0.Add(210*time.Minute)) {
		t.Fatalf("status %+v", st)
	}
}

// recordString is a key_state record in short form: "v2 active->overlap
// schedule".
func recordString(r audit.KeyState) string {
	if r.Key != "ticket" || r.SPIFFEID != "" || r.Serial != "" {
		return fmt.Sprintf("unexpected record %+v", r)
	}
	return fmt.Sprintf("v%d %s->%s %s", r.Version, r.From, r.To, r.Cause)
}

func TestTicketPeriod(t *testing.T) {
	t.Parallel()
	now := time.Now()
	leaf := func(lifetime time.Duration) *x509.Certificate {
		return &x509.Certificate{NotBefore: now, NotAfter: now.Add(lifetime)}
	}
	tests := []struct {
		name       string
		configured time.Duration
		leaf       *x509.Certificate
		want       time.Duration
	}{
		{name: "no_svid", configured: time.Hour, want: time.Hour},
		{name: "long_lived_svid", configured: time.Hour, leaf: leaf(90 * 24 * time.Hour), want: time.Hour},
		{name: "exactly_twice", configured: time.Hour, leaf: leaf(2 * time.Hour), want: time.Hour},
		{name: "short_lived_svid", configured: time.Hour, leaf: leaf(5 * time.Minute), want: 150 * time.Second},
		{name: "degenerate_svid", configured: time.Hour, leaf: leaf(0), want: time.Second},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := &Proxy{cfg: Config{TicketKeyPeriod: tc.configured}}
			if got := p.ticketPeriod(tc.leaf); got != tc.want {
				t.Fatalf("ticketPeriod = %s, want %s", got, tc.want)
			}
		})
	}
}
