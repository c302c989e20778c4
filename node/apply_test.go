package node

import (
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/rotator"
)

// denyIdentity is a deny-list that revokes every certificate of one identity.
type denyIdentity spiffeid.ID

func (d denyIdentity) Denies(id spiffeid.ID, _ string, _ time.Time) bool { return id == spiffeid.ID(d) }

// TestApplyEntries: a new mesh state's registration entries make the node hold exactly
// the identities of its own host's agents: one registered is started and answers by uid
// and port, one removed loses its SVID and its rotator, another host's is never held.
func TestApplyEntries(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFixture(t)
		f.register(registration{ID: planner, Host: testHost, UID: 1001, Port: 8080}, registration{ID: search, Host: otherHost, UID: 1002})
		rot, ok := f.agents.lookup(planner)
		if !ok {
			t.Fatal("planner, registered to this host, is not held")
		}
		if _, ok := f.agents.lookup(search); ok {
			t.Fatal("search, registered to another host, is held")
		}
		if id, _, ok := f.agents.ByUID(1001); !ok || id != planner {
			t.Fatalf("ByUID(1001) = %s, %t; want planner", id, ok)
		}
		if id, ok := f.agents.ByPort(8080); !ok || id != planner {
			t.Fatalf("ByPort(8080) = %s, %t; want planner", id, ok)
		}
		if err := f.agents.ready(); err != nil {
			t.Fatalf("ready() = %v once planner enrolled", err)
		}

		f.register(registration{ID: search, Host: testHost, UID: 1002})
		if _, ok := f.agents.lookup(planner); ok {
			t.Fatal("planner still held after its registration was removed")
		}
		if _, _, ok := f.agents.ByUID(1001); ok {
			t.Fatal("planner's uid still answers after its registration was removed")
		}
		if st := rot.Status(); st.Ready || !st.Revoked {
			t.Fatalf("removed agent's rotator: ready=%t revoked=%t, want its SVID dropped", st.Ready, st.Revoked)
		}
		ids := []string{}
		for _, st := range f.applier.held() {
			ids = append(ids, st.ID().String())
		}
		if want := []string{testHost.String(), search.String()}; !slices.Equal(ids, want) {
			t.Fatalf("held identities = %v, want %v", ids, want)
		}
	})
}

// TestApplyDenyList: a new deny-list reaches the proxy and every rotator, and only the
// denied identity loses its SVID.
func TestApplyDenyList(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFixture(t)
		f.register(registration{ID: planner, Host: testHost, UID: 1001})
		agent, _ := f.agents.lookup(planner)

		list := denyIdentity(planner)
		f.applier.onDenyList(list)
		synctest.Wait()
		if len(f.px.denyLists) != 1 || f.px.denyLists[0] != list {
			t.Fatalf("proxy got deny-lists %v, want the new one", f.px.denyLists)
		}
		if st := agent.Status(); !st.Revoked {
			t.Fatalf("denied agent's status = %+v, want its SVID dropped", st)
		}
		if st := f.rot.Status(); st.Revoked || !st.Ready {
			t.Fatalf("host's status = %+v, want it untouched", st)
		}
	})
}

// TestApplyRotateOne: the control socket finds the host's identity by the zero ID or its
// own, an agent's by its ID, and no other.
func TestApplyRotateOne(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFixture(t)
		f.register(registration{ID: planner, Host: testHost, UID: 1001})
		for _, id := range []spiffeid.ID{{}, testHost, planner} {
			rotate, ok := f.applier.rotateOne(id)
			if !ok {
				t.Fatalf("rotateOne(%q) found nothing", id)
			}
			res, err := rotate(t.Context(), rotator.RotateRequest{Trigger: rotator.TriggerOperator, Actor: audit.Actor{Initiator: "uid:0"}, Reason: "test"})
			if err != nil || res.OldSerial == "" || res.NewVersion != res.OldVersion+1 {
				t.Fatalf("rotate %q = %+v, %v; want a new version", id, res, err)
			}
		}
		if v := f.rot.Status().Current.Version; v != 3 {
			t.Fatalf("host at version %d after two rotations by name, want 3", v)
		}
		if _, ok := f.applier.rotateOne(search); ok {
			t.Fatal("rotateOne found an identity this node does not hold")
		}
	})
}

// TestApplyFleetRotation: a fleet command rotates every identity held, the host's first.
func TestApplyFleetRotation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFixture(t)
		f.register(registration{ID: planner, Host: testHost, UID: 1001})
		f.applier.onFleetRotation(7, "drill")
		synctest.Wait()
		for _, h := range f.applier.held() {
			st := h.(*rotator.Rotator).Status()
			if st.Current == nil || st.Current.Version != 2 {
				t.Fatalf("%s after a fleet rotation: %+v, want version 2", h.ID(), st.Current)
			}
		}
	})
}
