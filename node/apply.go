package node

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/policy"
	"github.com/agentmesh/agentmesh/proxy"
	"github.com/agentmesh/agentmesh/rotator"
)

// liveProxy is what mesh states and configuration changes change in the running proxy.
type liveProxy interface {
	ticketKeyResetter
	SetDenyList(proxy.Denier) (closed int)
	SetPolicy(*policy.Authz) (version uint64, closed int)
	SetRoutes([]proxy.Route) error
	SetServices([]proxy.Service) (closed int, err error)
	SetDrainGrace(time.Duration)
}

// applier applies each new mesh state and each configuration change to the running
// components, as a diff: identities to hold, deny-list, policy, trust bundle, rotation
// policy, listeners.
type applier struct {
	rot      *rotator.Rotator
	agents   *agents
	live     liveProxy
	rotation rotation
	auditor  rotator.Auditor
	log      *slog.Logger
	// fleetCtx bounds the rotations fleet commands start (the process's context).
	fleetCtx context.Context
	// started is when the node started: fleet rotations requested before it are not
	// run (its credentials are newer).
	started time.Time
	bundles bundleSources
	// caAnchors follow the bundle in force (the mesh client's); nil: none to follow.
	caAnchors anchorSetter
	// anchor follows the steps of rotations of the CA's trust anchors.
	anchor anchorFollower
	// heartbeat reports this proxy's status to the CA; nil: none to kick.
	heartbeat kicker
}

// onEntries takes the directory's registration entries: the agents' supervisor starts
// and stops rotators to hold exactly this host's agents.
func (a *applier) onEntries(entries []registration) { a.agents.update(entries) }

// onDenyList applies a new deny-list: every rotator drops the credentials it denies, and
// the proxy refuses them and closes their connections.
func (a *applier) onDenyList(l proxy.Denier) int {
	if a.rot.Revoke(l.Denies)+a.agents.revoke(l.Denies) > 0 {
		// The CA's fleet view shows the drop (and the re-enrolment's failure) now.
		a.kickHeartbeat()
	}
	return a.live.SetDenyList(l)
}

// onFleetRotation rotates every identity held, off the directory's goroutine: a
// rotation waits for the CA.
func (a *applier) onFleetRotation(id uint64, reason string) {
	go func() {
		req := rotator.RotateRequest{Trigger: rotator.TriggerFleet, Actor: audit.Actor{Initiator: "ca"}, Reason: reason}
		if _, err := a.rotateAll(a.fleetCtx, req); err != nil {
			a.log.Warn("fleet rotation failed", "fleet_rotation", id, "err", err)
		}
	}()
}

// held lists every identity held: the host's first, then every agent's.
func (a *applier) held() []heldIdentity {
	out := []heldIdentity{a.rot}
	for _, r := range a.agents.rotators() {
		out = append(out, r)
	}
	return out
}

// rotateAll rotates every identity held.
func (a *applier) rotateAll(ctx context.Context, req rotator.RotateRequest) (rotator.RotateResult, error) {
	return a.rotation.all(ctx, a.held(), req)
}

// rotateOne finds the rotation of one identity by name (the zero ID: the host's).
func (a *applier) rotateOne(id spiffeid.ID) (rotateFunc, bool) {
	if id.IsZero() || id == a.rot.ID() {
		return a.rotation.of(a.rot), true
	}
	if r, ok := a.agents.lookup(id); ok {
		return a.rotation.of(r), true
	}
	return nil, false
}

// setRotation makes p the rotation policy of every identity held and replaces the
// session-ticket keys (a policy change is a security event). The host's rotator
// refusing p leaves everything as it was.
func (a *applier) setRotation(p policy.RotationPolicy) error {
	if err := a.rot.SetPolicy(p); err != nil {
		return err
	}
	if err := a.agents.setRotation(p); err != nil {
		a.log.Error("rotation policy refused by an agent's rotator", "err", err)
	}
	a.live.SetDrainGrace(p.WithDefaults().DrainGrace)
	a.live.ResetTicketKeys("policy")
	return nil
}

// setPolicy makes authz the authorization policy, at once for new, resumed and live
// connections, and returns its version and the connections it closed.
func (a *applier) setPolicy(authz *policy.Authz) (version uint64, closed int) {
	return a.live.SetPolicy(authz)
}

// bundleRefused audits a root file that does not load.
func (a *applier) bundleRefused(err error) error { return a.auditor.Append(a.rot.BundleRefused(err)) }

// appendAudit writes a record of a change.
func (a *applier) appendAudit(e audit.Event) error { return a.auditor.Append(e) }

// applyListeners makes routes and services those in force, live: a kept route keeps its
// listener and connections, a removed one stops accepting and drains its connections
// after the rotation policy's grace, a narrowed allow list closes the connections it no
// longer allows. A set the proxy refuses changes nothing.
func (a *applier) applyListeners(routes []proxy.Route, services []proxy.Service) error {
	if err := a.live.SetRoutes(routes); err != nil {
		return fmt.Errorf("routes: %w", err)
	}
	closed, err := a.live.SetServices(services)
	if err != nil {
		return fmt.Errorf("services: %w", err)
	}
	a.log.Info("routes and services reloaded", "routes", len(routes), "services", len(services), "closed", closed)
	return nil
}
