package ca

import (
	"sync"
	"sync/atomic"

	"github.com/agentmesh/agentmesh/meshapi"
)

// The parts a Server is composed of besides the authority (ca/authority), the mesh
// registry (registry) and the database (authDB). Each guards its own state: readers
// load the value in force without a lock; writers serialise on the part's mutex.

// entryStore holds the registration entries in force.
type entryStore struct {
	atomic.Pointer[entrySet]
	mu sync.Mutex // serialises changes
}

// claimStore holds the address claims in force and their metrics.
type claimStore struct {
	atomic.Pointer[claimSet]
	// mu, read: a registration checked and applied; write: claims changed.
	mu      sync.RWMutex
	metrics *claimMetrics
}

// denyStore holds the deny-list in force.
type denyStore struct {
	atomic.Pointer[denyState]
	// mu serialises revocations, reinstatements and pruning: each builds on the
	// version the previous one published.
	mu   sync.Mutex
	wake chan struct{} // coalesced: a deny-list was published
}

// fleetStore holds the latest fleet rotation.
type fleetStore struct {
	mu     sync.Mutex // serialises RotateFleet
	latest *meshapi.FleetRotation
}
