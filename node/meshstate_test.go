package node

import (
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testaudit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/rotator"
)

// stateOf is a mesh state of directory version v with doc's sections and the deny-list
// l (nil: none), as the mesh client publishes it for testHost.
func stateOf(t *testing.T, v uint64, doc meshapi.DirectoryDocument, l *meshapi.DenyList) *meshapi.State {
	t.Helper()
	st := &meshapi.State{}
	if v != 0 {
		doc.Version = v
		next, err := meshapi.NewState(&doc, testHost)
		if err != nil {
			t.Fatal(err)
		}
		st = st.WithDirectory(next)
	}
	if l != nil {
		st = st.WithDenyList(l)
	}
	return st
}

func TestDiffStates(t *testing.T) {
	started := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	entry := meshapi.Entry{ID: planner, Host: testHost, UID: 1001, Port: 8080}
	other := meshapi.Entry{ID: search, Host: otherHost}
	l1, l2 := &meshapi.DenyList{Version: 1}, &meshapi.DenyList{Version: 2}
	early := &meshapi.FleetRotation{ID: 5, At: started.Add(-time.Minute)}
	late := &meshapi.FleetRotation{ID: 6, At: started.Add(time.Minute)}
	roots := testca.New(t).Roots()
	bundle := meshapi.NewBundleDocument(roots)
	none := meshapi.DirectoryDocument{}
	for _, tc := range []struct {
		name        string
		prev, next  *meshapi.State
		entries     []registration // nil with entriesChanged false: unchanged
		changed     bool
		deny, held  *meshapi.DenyList
		fleet       *meshapi.FleetRotation
		bundleRoots int
	}{
		{name: "nothing yet", prev: stateOf(t, 0, none, nil), next: stateOf(t, 0, none, nil)},
		{name: "deny-list before the first directory", prev: stateOf(t, 0, none, nil), next: stateOf(t, 0, none, l1), deny: l1},
		{name: "first directory, no entries", prev: stateOf(t, 0, none, l1), next: stateOf(t, 1, none, l1), changed: true},
		{name: "first directory with entries", prev: stateOf(t, 0, none, nil),
			next:    stateOf(t, 1, meshapi.DirectoryDocument{Entries: []meshapi.Entry{other, entry}}, nil),
			entries: []registration{{ID: planner, Host: testHost, UID: 1001, Port: 8080}, {ID: search, Host: otherHost}}, changed: true},
		{name: "new version, same entries", prev: stateOf(t, 1, meshapi.DirectoryDocument{Entries: []meshapi.Entry{entry}}, nil),
			next: stateOf(t, 2, meshapi.DirectoryDocument{Entries: []meshapi.Entry{entry}}, nil)},
		{name: "entries removed", prev: stateOf(t, 1, meshapi.DirectoryDocument{Entries: []meshapi.Entry{entry}}, nil),
			next: stateOf(t, 2, none, nil), changed: true},
		{name: "newer deny-list", prev: stateOf(t, 1, none, l1), next: stateOf(t, 1, none, l2), deny: l2, held: l1},
		{name: "same deny-list, new directory", prev: stateOf(t, 1, none, l2), next: stateOf(t, 2, none, l2)},
		{name: "fleet rotation requested before start", prev: stateOf(t, 1, none, nil),
			next: stateOf(t, 2, meshapi.DirectoryDocument{Rotation: early}, nil)},
		{name: "fleet rotation requested after start", prev: stateOf(t, 1, meshapi.DirectoryDocument{Rotation: early}, nil),
			next: stateOf(t, 2, meshapi.DirectoryDocument{Rotation: late}, nil), fleet: late},
		{name: "same fleet rotation again", prev: stateOf(t, 2, meshapi.DirectoryDocument{Rotation: late}, nil),
			next: stateOf(t, 3, meshapi.DirectoryDocument{Rotation: late}, nil)},
		{name: "first bundle", prev: stateOf(t, 1, none, nil), next: stateOf(t, 2, meshapi.DirectoryDocument{Bundle: bundle}, nil),
			bundleRoots: 1},
		{name: "same bundle", prev: stateOf(t, 2, meshapi.DirectoryDocument{Bundle: bundle}, nil),
			next: stateOf(t, 3, meshapi.DirectoryDocument{Bundle: bundle}, nil)},
		{name: "bundle no longer published", prev: stateOf(t, 2, meshapi.DirectoryDocument{Bundle: bundle}, nil),
			next: stateOf(t, 3, none, nil)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := diffStates(tc.prev, tc.next, started)
			if d.entriesChanged != tc.changed || !slices.Equal(d.entries, tc.entries) {
				t.Errorf("entries %t %v, want %t %v", d.entriesChanged, d.entries, tc.changed, tc.entries)
			}
			if d.denyList != tc.deny || d.heldDeny != tc.held {
				t.Errorf("deny-list %v after %v, want %v after %v", d.denyList, d.heldDeny, tc.deny, tc.held)
			}
			if d.fleet != tc.fleet {
				t.Errorf("fleet rotation %+v, want %+v", d.fleet, tc.fleet)
			}
			if len(d.bundle) != tc.bundleRoots || (tc.bundleRoots > 0) != (d.bundleVersion == bundle.Version) {
				t.Errorf("bundle of %d roots, version %q; want %d roots", len(d.bundle), d.bundleVersion, tc.bundleRoots)
			}
		})
	}
}

// statePublisher stands for the mesh client's watch: it publishes states and signals.
type statePublisher struct {
	state   atomic.Pointer[meshapi.State]
	updated chan struct{}
}

func newStatePublisher() *statePublisher {
	p := &statePublisher{updated: make(chan struct{}, 1)}
	p.state.Store(&meshapi.State{})
	return p
}

func (p *statePublisher) Updated() <-chan struct{} { return p.updated }
func (p *statePublisher) State() *meshapi.State    { return p.state.Load() }

func (p *statePublisher) publish(st *meshapi.State) {
	p.state.Store(st)
	select {
	case p.updated <- struct{}{}:
	default:
	}
}

// followed is the fixture with its applier following the states of a publisher, until
// the test ends; call it inside a synctest bubble.
func followed(t *testing.T) (*fixture, *statePublisher) {
	t.Helper()
	f, src := newFixture(t), newStatePublisher()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { _ = f.applier.followMesh(ctx, src) })
	wg.Go(func() { _ = f.applier.followAnchors(ctx) })
	t.Cleanup(func() { cancel(); wg.Wait() })
	return f, src
}

// recordsOf returns the records of type T, in order.
func recordsOf[T audit.Event](r *auditRecords) []T {
	r.mu.Lock()
	defer r.mu.Unlock()
	return testaudit.Of[T](r.list)
}

// TestFollowMeshDenyList: each deny-list version is applied once, to the proxy and the
// rotators, and recorded with what it closed; a new directory version with the same
// list applies nothing again; the first directory starts the agents registered to this
// host.
func TestFollowMeshDenyList(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, src := followed(t)

		l1 := &meshapi.DenyList{Version: 1, IssuedAt: time.Now()}
		src.publish(stateOf(t, 0, meshapi.DirectoryDocument{}, l1)) // before any directory
		synctest.Wait()
		entries := meshapi.DirectoryDocument{Entries: []meshapi.Entry{{ID: planner, Host: testHost, UID: 1001}}}
		src.publish(stateOf(t, 7, entries, l1))
		synctest.Wait()
		if _, ok := f.agents.lookup(planner); !ok {
			t.Fatal("the first directory's agent is not held")
		}
		src.publish(stateOf(t, 8, entries, l1))
		synctest.Wait()
		// Signed a second ago: the bubble's clock stands still, so the lag is exact.
		l2 := &meshapi.DenyList{Version: 2, IssuedAt: time.Now().Add(-time.Second), IDs: []meshapi.DeniedID{{SPIFFEID: planner}}}
		src.publish(stateOf(t, 8, entries, l2))
		synctest.Wait()
		src.publish(stateOf(t, 9, entries, l2))
		synctest.Wait()

		if got := len(f.px.denyLists); got != 2 {
			t.Fatalf("proxy got %d deny-lists, want one per version", got)
		}
		recs := recordsOf[audit.DenyListChange](f.audit)
		if len(recs) != 2 {
			t.Fatalf("deny-list records %+v, want one per version", recs)
		}
		want := audit.DenyListChange{Version: 2, Previous: 1, Result: string(audit.LoadApplied), IDs: 1, Lag: time.Second}
		if recs[0].Version != 1 || recs[0].Previous != 0 || recs[1] != want {
			t.Fatalf("records %+v, want version 1 then %+v", recs, want)
		}
		agent, ok := f.agents.lookup(planner)
		if !ok {
			t.Fatal("the denied agent's rotator is gone; want it held with its SVID dropped")
		}
		if st := agent.Status(); !st.Revoked {
			t.Fatalf("denied agent's status = %+v, want its SVID dropped", st)
		}
	})
}

// TestFollowMeshFleetRotation: a fleet rotation requested after start rotates every
// identity once, however many states carry it.
func TestFollowMeshFleetRotation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, src := followed(t)
		fr := &meshapi.FleetRotation{ID: 9, At: time.Now().Add(time.Second), Reason: "drill"}
		for v := range uint64(3) {
			src.publish(stateOf(t, v+1, meshapi.DirectoryDocument{Rotation: fr}, nil))
			synctest.Wait()
		}
		if v := f.rot.Status().Current.Version; v != 2 {
			t.Fatalf("host at version %d after one fleet rotation in three states, want 2", v)
		}
	})
}

// TestFollowMeshBundle: a published bundle replaces the root file's, but the anchor of
// the SVIDs held stays in force until none needs it; each change is audited, and an
// anchor leaving resets the ticket keys.
func TestFollowMeshBundle(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, src := followed(t)
		foreign := testca.New(t, testca.WithTrustDomain(testHost.TrustDomain()))

		src.publish(stateOf(t, 1, meshapi.DirectoryDocument{Bundle: meshapi.NewBundleDocument(foreign.Roots())}, nil))
		synctest.Wait()
		recs := recordsOf[*audit.TrustBundle](f.audit)
		if len(recs) != 1 || recs[0].Result != audit.BundleApplied || len(recs[0].Added) != 1 || len(recs[0].Removed) != 0 {
			t.Fatalf("bundle records %+v, want the published CA added", recs)
		}
		if b := f.applier.bundleInForce(); len(b.X509Authorities()) != 2 || !b.HasX509Authority(f.ca.Roots()[0]) {
			t.Fatalf("bundle of %d anchors, want the published one and the SVID's", len(b.X509Authorities()))
		}

		both := append(f.ca.Roots(), foreign.Roots()...)
		src.publish(stateOf(t, 2, meshapi.DirectoryDocument{Bundle: meshapi.NewBundleDocument(both)}, nil))
		synctest.Wait()
		if v := f.rot.BundleVersion(); v != meshapi.BundleVersion(both) {
			t.Fatalf("bundle version %s, want the published %s", v, meshapi.BundleVersion(both))
		}

		// The mesh state no longer lists the other CA: it leaves, and ticket keys with it.
		src.publish(stateOf(t, 3, meshapi.DirectoryDocument{Bundle: meshapi.NewBundleDocument(f.ca.Roots())}, nil))
		synctest.Wait()
		if n := f.rot.Status().BundleLen; n != 1 || !slices.Equal(f.px.resets(), []string{"ca_removed"}) {
			t.Fatalf("bundle of %d anchors, ticket resets %v; want 1 and ca_removed", n, f.px.resets())
		}
	})
}

// TestBundleVersionAgrees: the version the CA publishes names a bundle as the proxy's
// heartbeat does.
func TestBundleVersionAgrees(t *testing.T) {
	roots := append(testca.New(t).Roots(), testca.New(t).Roots()...)
	if a, b := meshapi.BundleVersion(roots), rotator.BundleVersion(roots); a != b {
		t.Fatalf("meshapi.BundleVersion %s, rotator.BundleVersion %s", a, b)
	}
}
