package node

import (
	"context"
	"crypto/x509"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

// meshStates is where new mesh states come from: the mesh client's watch publishes each
// one (State) and signals Updated; notifications coalesce, so only the latest counts.
type meshStates interface {
	Updated() <-chan struct{}
	State() *meshapi.State
}

// stateDiff is what a mesh state changes from the one applied before it.
type stateDiff struct {
	// entries are the registration entries to hold, when entriesChanged: they differ,
	// or the first directory arrived (which tells the agents' supervisor it knows).
	entries        []registration
	entriesChanged bool
	// denyList is a newer deny-list to apply, nil when unchanged; heldDeny is the one
	// applied before it (nil: none).
	denyList, heldDeny *meshapi.DenyList
	// fleet is a fleet rotation to run: newer than any seen and requested after start.
	fleet *meshapi.FleetRotation
	// bundle are the CA's roots as the state publishes them, when their version
	// changed; nil otherwise.
	bundle        []*x509.Certificate
	bundleVersion string
	// anchor is the step of a rotation of the CA's anchors to converge to, when
	// anchorChanged: a new step, or none any more (nil).
	anchor        *meshapi.AnchorRotation
	anchorChanged bool
	anchorRoots   []*x509.Certificate // the step's bundle
}

// diffStates is what applying next after prev changes, for a node started at started.
// Pure. prev is the empty State (version 0) before the first one.
func diffStates(prev, next *meshapi.State, started time.Time) stateDiff {
	var d stateDiff
	if next.Version() != 0 && (prev.Version() == 0 || !prev.SameEntries(next)) {
		d.entriesChanged = true
		for _, e := range next.Entries() {
			d.entries = append(d.entries, registration{ID: e.ID, Host: e.Host, UID: e.UID, Port: e.Port})
		}
	}
	if l, held := next.DenyList(), prev.DenyList(); l != nil && (held == nil || l.Version != held.Version) {
		d.denyList, d.heldDeny = l, held
	}
	if fr := next.Rotation(); fr != nil {
		var seen uint64
		if p := prev.Rotation(); p != nil {
			seen = p.ID
		}
		if _, due := meshapi.FleetDue(seen, started, *fr); due {
			d.fleet = fr
		}
	}
	if v := next.BundleVersion(); v != "" && v != prev.BundleVersion() {
		d.bundle, d.bundleVersion = next.Bundle(), v
	}
	if r := next.AnchorRotation(); !sameStep(prev.AnchorRotation(), r) {
		d.anchor, d.anchorChanged, d.anchorRoots = r, true, next.Bundle()
	}
	return d
}

// followMesh applies each new mesh state src publishes, as a diff against the one
// applied before, until ctx is done. A state published before the proxy runs is
// applied at once, as later ones are: the proxy holds what it is given until it serves.
func (a *applier) followMesh(ctx context.Context, src meshStates) error {
	prev := &meshapi.State{}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-src.Updated():
		}
		next := src.State()
		a.applyDiff(diffStates(prev, next, a.started))
		prev = next
	}
}

// applyDiff applies d: the deny-list first, so that nothing a newer state brings runs
// under an older list; then the identities to hold, the trust bundle, a fleet rotation,
// and a step of a rotation of the CA's anchors (whose bundle is then in force).
func (a *applier) applyDiff(d stateDiff) {
	if d.denyList != nil {
		a.applyDenyList(d.heldDeny, d.denyList)
	}
	if d.entriesChanged {
		a.onEntries(d.entries)
	}
	if d.bundle != nil {
		a.applyMeshBundle(d.bundleVersion, d.bundle)
	}
	if d.fleet != nil {
		a.log.Info("fleet rotation requested by the ca", "fleet_rotation_id", d.fleet.ID,
			"requested_at", d.fleet.At, "reason", d.fleet.Reason)
		a.onFleetRotation(d.fleet.ID, d.fleet.Reason)
	}
	if d.anchorChanged {
		a.followAnchor(d.anchor, d.anchorRoots)
	}
}

// applyDenyList enforces l, newer than held, and records it with the connections it
// closed.
func (a *applier) applyDenyList(held, l *meshapi.DenyList) {
	closed := a.onDenyList(l)
	rec := audit.DenyListChange{Version: l.Version, Result: string(audit.LoadApplied), IDs: len(l.IDs),
		Serials: len(l.Serials), Closed: closed, Expired: meshapi.ExpiredEntries(held, l), Lag: time.Since(l.IssuedAt)}
	if held != nil {
		rec.Previous = held.Version
	}
	a.log.Info("deny list applied", "version", rec.Version, "previous", rec.Previous, "ids", rec.IDs,
		"serials", rec.Serials, "closed", closed, "expired", rec.Expired, "lag", rec.Lag)
	if err := a.auditor.Append(rec); err != nil {
		a.log.Error("audit deny list", "err", err, "version", rec.Version)
	}
}
