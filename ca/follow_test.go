package ca

import (
	"slices"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"
)

// stateFollower reads the states a proxy's Watch publishes as the proxy applies them:
// each new state against the one it applied before.
type stateFollower struct {
	w       *meshclient.Watch
	created time.Time      // when the proxy started, for fleet rotations
	prev    *meshapi.State // the state last returned
	fleet   uint64         // the highest fleet rotation ID seen
}

func newStateFollower(w *meshclient.Watch, created time.Time) *stateFollower {
	return &stateFollower{w: w, created: created, prev: &meshapi.State{}}
}

// next waits, on Updated, for a published state that changes from the last one
// returned what changed reports; the guard is well under the 25s long-poll, so a pass
// means the poll was woken.
func (f *stateFollower) next(t *testing.T, what string, changed func(prev, next *meshapi.State) bool) *meshapi.State {
	t.Helper()
	guard := time.NewTimer(10 * time.Second)
	defer guard.Stop()
	for {
		if st := f.w.State(); changed(f.prev, st) {
			f.prev = st
			return st
		}
		select {
		case <-f.w.Updated():
		case <-guard.C:
			t.Fatalf("no state with %s within 10s (directory version %d)", what, f.w.State().Version())
		}
	}
}

// entries waits for the first directory, or for one whose entries changed, and returns
// its entries.
func (f *stateFollower) entries(t *testing.T) []meshapi.Entry {
	t.Helper()
	return f.next(t, "changed entries", func(prev, next *meshapi.State) bool {
		return next.Version() != 0 && (prev.Version() == 0 || !slices.Equal(prev.Entries(), next.Entries()))
	}).Entries()
}

// denyList waits for a state with a newer deny-list and returns it.
func (f *stateFollower) denyList(t *testing.T) *meshapi.DenyList {
	t.Helper()
	return f.next(t, "a newer deny-list", func(prev, next *meshapi.State) bool {
		return next.DenyList() != nil && (prev.DenyList() == nil || next.DenyList().Version > prev.DenyList().Version)
	}).DenyList()
}

// fleetDue reports the fleet rotation of the state in force when it is due
// (meshapi.FleetDue), marking it seen.
func (f *stateFollower) fleetDue() (meshapi.FleetRotation, bool) {
	fr := f.w.State().Rotation()
	if fr == nil {
		return meshapi.FleetRotation{}, false
	}
	var due bool
	f.fleet, due = meshapi.FleetDue(f.fleet, f.created, *fr)
	return *fr, due
}

// nextFleet waits for a state with a fleet rotation due.
func nextFleet(t *testing.T, f *stateFollower) meshapi.FleetRotation {
	t.Helper()
	var fr meshapi.FleetRotation
	f.next(t, "a fleet rotation due", func(_, _ *meshapi.State) bool {
		var due bool
		fr, due = f.fleetDue()
		return due
	})
	return fr
}

// noFleet fails when the state in force has a fleet rotation due.
func noFleet(t *testing.T, f *stateFollower, why string) {
	t.Helper()
	if fr, due := f.fleetDue(); due {
		t.Errorf("%s: fleet rotation %+v due", why, fr)
	}
}
