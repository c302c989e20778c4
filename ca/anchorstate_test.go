package ca

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/meshapi"
)

func TestNextAnchorPhase(t *testing.T) {
	t.Parallel()
	walk := func(p meshapi.AnchorPhase) []meshapi.AnchorPhase {
		out := []meshapi.AnchorPhase{p}
		for !p.Ended() {
			p = nextAnchorPhase(p)
			out = append(out, p)
		}
		return out
	}
	tests := []struct {
		name string
		from meshapi.AnchorPhase
		want string
	}{
		{"rotation", meshapi.PhasePrepare, "prepare distribute activate retire destroy done"},
		{"abort", meshapi.PhaseAbort, "abort abort-retire aborted"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var got []string
			for _, p := range walk(tc.from) {
				got = append(got, string(p))
			}
			if strings.Join(got, " ") != tc.want {
				t.Fatalf("phases %v, want %s", got, tc.want)
			}
		})
	}
}

// The gates: every member not excluded acknowledges the phase; activate (and an abort
// after activate) also waits for what the replaced key issued to expire.
func TestAnchorGates(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	a, b := spiffeid.RequireFromPath(testTD, "/host/a"), spiffeid.RequireFromPath(testTD, "/host/b")
	const lifetime, bd = time.Minute, 6 * time.Second
	rec := func(p meshapi.AnchorPhase, members ...anchorMember) *anchorRecord {
		r := &anchorRecord{ID: 1, Phase: p, Since: t0, Members: members}
		if p == meshapi.PhaseActivate {
			r.Activated = t0
		}
		return r
	}
	tests := []struct {
		name    string
		rec     *anchorRecord
		now     time.Time
		waiting string // substring; "" = open
	}{
		{"no members", rec(meshapi.PhaseDistribute), t0, ""},
		{"one missing", rec(meshapi.PhaseDistribute, anchorMember{ID: a, Acked: meshapi.PhaseDistribute}, anchorMember{ID: b}), t0, "from 1 proxies"},
		{"acked an earlier phase", rec(meshapi.PhaseRetire, anchorMember{ID: a, Acked: meshapi.PhaseActivate}), t0, "acknowledgements of retire"},
		{"excluded does not block", rec(meshapi.PhaseDistribute, anchorMember{ID: a, Excluded: true}), t0, ""},
		{"activate before expiry", rec(meshapi.PhaseActivate, anchorMember{ID: a, Acked: meshapi.PhaseActivate}), t0.Add(lifetime), "expiry"},
		{"activate after expiry", rec(meshapi.PhaseActivate, anchorMember{ID: a, Acked: meshapi.PhaseActivate}), t0.Add(lifetime + bd), ""},
		{"abort without activation", rec(meshapi.PhaseAbort, anchorMember{ID: a, Acked: meshapi.PhaseAbort}), t0, ""},
		{"abort after activation", &anchorRecord{ID: 1, Phase: meshapi.PhaseAbort, Reverted: t0,
			Members: []anchorMember{{ID: a, Acked: meshapi.PhaseAbort}}}, t0.Add(time.Second), "expiry"},
		{"failed effect", &anchorRecord{ID: 1, Phase: meshapi.PhaseDestroy, Error: "token gone"}, t0, "failed"},
		{"destroy", rec(meshapi.PhaseDestroy, anchorMember{ID: a}), t0, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got := tc.rec.waiting(tc.now, lifetime, bd)
			if (tc.waiting == "") != (got == "") || !strings.Contains(got, tc.waiting) {
				t.Fatalf("waiting = %q, want %q", got, tc.waiting)
			}
		})
	}
}

func TestCheckAck(t *testing.T) {
	t.Parallel()
	rec := &anchorRecord{ID: 7, Phase: meshapi.PhaseRetire, Bundle: "v2", Published: []string{"v1", "v2"}}
	tests := []struct {
		name   string
		rec    *anchorRecord
		ack    meshapi.AnchorAck
		reason ackRefusal
		err    error
	}{
		{"current", rec, meshapi.AnchorAck{ID: 7, Phase: meshapi.PhaseRetire, BundleVersion: "v2"}, "", nil},
		{"no rotation", nil, meshapi.AnchorAck{ID: 7, Phase: meshapi.PhaseRetire, BundleVersion: "v2"}, ackStale, errStaleAck},
		{"other rotation", rec, meshapi.AnchorAck{ID: 6, Phase: meshapi.PhaseRetire, BundleVersion: "v2"}, ackStale, errStaleAck},
		{"earlier phase", rec, meshapi.AnchorAck{ID: 7, Phase: meshapi.PhaseActivate, BundleVersion: "v2"}, ackStale, errStaleAck},
		{"earlier bundle", rec, meshapi.AnchorAck{ID: 7, Phase: meshapi.PhaseRetire, BundleVersion: "v1"}, ackStale, errStaleAck},
		{"never published", rec, meshapi.AnchorAck{ID: 7, Phase: meshapi.PhaseRetire, BundleVersion: "v9"}, ackUnpublished, ErrInvalidRequest},
		{"ended", &anchorRecord{ID: 7, Phase: meshapi.PhaseDone, Published: []string{"v2"}},
			meshapi.AnchorAck{ID: 7, Phase: meshapi.PhaseDone, BundleVersion: "v2"}, ackStale, errStaleAck},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			reason, err := tc.rec.checkAck(tc.ack)
			if reason != tc.reason || !errors.Is(err, tc.err) || (tc.err == nil) != (err == nil) {
				t.Fatalf("checkAck = %q, %v; want %q, %v", reason, err, tc.reason, tc.err)
			}
		})
	}
}

// An acknowledgement makes its sender a member (a proxy that registered during the
// rotation) and counts once per phase; the status lists who is missing.
func TestAnchorAckedAndStatus(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	a, b := spiffeid.RequireFromPath(testTD, "/host/a"), spiffeid.RequireFromPath(testTD, "/host/b")
	rec := &anchorRecord{ID: 1, Phase: meshapi.PhaseDistribute, Since: t0}
	rec.join(a, t0)
	if !rec.acked(b, t0) || rec.acked(b, t0.Add(time.Second)) {
		t.Fatal("acked: want new once, then not new")
	}
	live := func(hb time.Time) bool { return !hb.IsZero() }
	st := rec.status(t0.Add(3*time.Second), live, time.Minute, time.Second)
	if len(st.Members) != 2 || len(st.Missing) != 1 || st.Missing[0] != a || st.PhaseMS != 3000 {
		t.Fatalf("status = %+v", st)
	}
	if !st.Members[0].Live || st.Members[1].Live {
		t.Fatalf("live = %v, %v; want a live (heartbeat), b not", st.Members[0].Live, st.Members[1].Live)
	}
	rec.enter(meshapi.PhaseActivate, t0.Add(5*time.Second))
	if got := rec.missing(); len(got) != 2 {
		t.Fatalf("missing after the phase changed = %v, want both", got)
	}
	if len(rec.Phases) != 1 || rec.Phases[0].MS != 5000 || !rec.Activated.Equal(t0.Add(5*time.Second)) {
		t.Fatalf("phases %+v, activated %v", rec.Phases, rec.Activated)
	}
}

// A proxy's repeat of its last acknowledgement is accepted after the rotation moved
// on (its answer was lost to a CA killed after recording it); a step it never
// acknowledged, another rotation's or an unpublished bundle's is not a repeat.
func TestAnchorAckRepeated(t *testing.T) {
	t.Parallel()
	a, b := spiffeid.RequireFromPath(testTD, "/host/a"), spiffeid.RequireFromPath(testTD, "/host/b")
	rec := &anchorRecord{ID: 7, Phase: meshapi.PhaseRetire, Bundle: "v2", Published: []string{"v1", "v2"}}
	rec.acked(a, time.Now())
	rec.Phase = meshapi.PhaseDone
	retire := meshapi.AnchorAck{ID: 7, Phase: meshapi.PhaseRetire, BundleVersion: "v2"}
	if !rec.repeated(a, retire) {
		t.Fatal("a's acknowledgement of retire, repeated after done, is not accepted")
	}
	for _, tc := range []struct {
		caller spiffeid.ID
		ack    meshapi.AnchorAck
	}{
		{b, retire},
		{a, meshapi.AnchorAck{ID: 7, Phase: meshapi.PhaseActivate, BundleVersion: "v2"}},
		{a, meshapi.AnchorAck{ID: 8, Phase: meshapi.PhaseRetire, BundleVersion: "v2"}},
		{a, meshapi.AnchorAck{ID: 7, Phase: meshapi.PhaseRetire, BundleVersion: "v9"}},
	} {
		if rec.repeated(tc.caller, tc.ack) {
			t.Errorf("%s %+v taken for a repeat", tc.caller, tc.ack)
		}
	}
	if (*anchorRecord)(nil).repeated(a, retire) {
		t.Error("a repeat with no rotation")
	}
}
