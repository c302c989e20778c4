package node

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"testing/synctest"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/rotator"
)

// TestCompromiseRevokesLineage: a compromised key drops every session-ticket key, rotates,
// and asks the CA, authenticated by the new SVID, to revoke the lineage but the new
// certificate.
func TestCompromiseRevokesLineage(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFixture(t)
		old := f.rot.Status().Current.Serial
		res, err := f.applier.rotation.now(t.Context(), f.rot, rotator.RotateRequest{Trigger: rotator.TriggerCompromise,
			Actor: audit.Actor{Initiator: "uid:0"}, Reason: "laptop stolen", Compromised: true})
		if err != nil {
			t.Fatal(err)
		}
		if res.OldSerial != old || res.NewSerial == "" || res.NewSerial == old {
			t.Fatalf("result = %+v, want %s replaced", res, old)
		}
		if got := f.px.resets(); !slices.Equal(got, []string{"compromise"}) {
			t.Fatalf("ticket key resets = %v, want one for the compromise", got)
		}
		want := revokeCall{id: testHost, keep: res.NewSerial, reason: "key-compromise: laptop stolen", presented: res.NewSerial}
		if len(f.revoker.calls) != 1 || f.revoker.calls[0] != want {
			t.Fatalf("revocations = %+v, want %+v", f.revoker.calls, want)
		}
	})
}

// TestOperatorRotationRevokesNothing: a plain operator rotation keeps the ticket keys and
// revokes nothing: the old key goes to overlap.
func TestOperatorRotationRevokesNothing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFixture(t)
		if _, err := f.applier.rotation.now(t.Context(), f.rot, rotator.RotateRequest{Trigger: rotator.TriggerOperator,
			Actor: audit.Actor{Initiator: "uid:0"}, Reason: "drill"}); err != nil {
			t.Fatal(err)
		}
		if len(f.px.resets()) != 0 || len(f.revoker.calls) != 0 {
			t.Fatalf("resets %v, revocations %v; want none", f.px.resets(), f.revoker.calls)
		}
	})
}

// TestCompromiseRevocationFails: when the CA does not revoke, the rotation stands and the
// error says which serial's lineage is still live.
func TestCompromiseRevocationFails(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFixture(t)
		f.revoker.err = errors.New("ca unreachable")
		old := f.rot.Status().Current.Serial
		res, err := f.applier.rotation.now(t.Context(), f.rot, rotator.RotateRequest{Trigger: rotator.TriggerCompromise,
			Actor: audit.Actor{Initiator: "uid:0"}, Reason: "leak", Compromised: true})
		if err == nil || !strings.Contains(err.Error(), "did not revoke the lineage of serial "+old) {
			t.Fatalf("err = %v, want the lineage of %s named", err, old)
		}
		if res.NewSerial == "" || f.rot.Status().Current.Serial != res.NewSerial {
			t.Fatalf("result %+v: the rotation did not stand", res)
		}
	})
}
