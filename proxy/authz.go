package proxy

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/policy"
)

// Authorization: who may reach what. Inbound, Services and the policy both
// grant (a port is reachable by a peer either allows); outbound, only the
// policy restricts, when it has outbound rules. Every decision reads the
// policy in force from one atomic pointer, so handshakes (resumed ones
// included), tunnel headers and streams see a SetPolicy at once; SetPolicy
// then closes what is already open and no longer allowed.

// authzState is the policy in force and its version, and the Services in
// force: one value, so that a decision reads both from one load.
type authzState struct {
	policy   *policy.Authz // nil: Services only, outbound unrestricted
	version  uint64        // 1 for Config.Policy, one more per SetPolicy
	services *serviceSet
	gen      uint64 // one more per SetPolicy or SetServices: what a connection was decided under
}

// serviceSet is the inbound Services as the decisions read them.
type serviceSet struct {
	ports    map[uint16]map[spiffeid.ID]struct{} // port -> allowed peers
	anywhere map[spiffeid.ID]struct{}            // union of every Allow
}

func newServiceSet(services []Service) *serviceSet {
	s := &serviceSet{ports: make(map[uint16]map[spiffeid.ID]struct{}, len(services)), anywhere: make(map[spiffeid.ID]struct{})}
	for _, svc := range services {
		allow := make(map[spiffeid.ID]struct{}, len(svc.Allow))
		for _, id := range svc.Allow {
			allow[id] = struct{}{}
			s.anywhere[id] = struct{}{}
		}
		s.ports[svc.Port] = allow
	}
	return s
}

// defaultRule names the decision when no rule allowed (policy.Decision.Name
// says the same).
const defaultRule = "default"

// verdict is the outcome of an authorization check.
type verdict struct {
	allow   bool
	rule    string // the deciding rule's name; defaultRule when nothing allowed
	version uint64 // of the policy that decided, for the audit record
	gen     uint64 // of the authorization state that decided (tunnelConn.authzVersion)
	reason  Reason // the refusal reason, when not allowed
	err     error  // the refusal, when not allowed
}

// admits reports whether some Service or the policy of st allows peer
// somewhere: the handshake-time check, before the port is known.
func (p *Proxy) admits(st *authzState, peer spiffeid.ID) bool {
	if _, ok := st.services.anywhere[peer]; ok {
		return true
	}
	return st.policy != nil && st.policy.InboundFrom(peer)
}

// decide authorizes a connection by the policy of st, from what its
// ConnInfo says. Inbound: PeerID may reach Port (and the local agent DstID
// there) if a Service for Port lists it or the policy allows it. Outbound:
// LocalID may call DstID (or, with no agent known there, the peer proxy
// PeerID) unless the policy has outbound rules that do not allow it. A
// passthrough connection has no peer identity: LocalID may reach its
// address outside the mesh unless the policy has outbound rules that do
// not allow it (policy.Authz.Passthrough).
func (p *Proxy) decide(st *authzState, ci ConnInfo) verdict {
	v := verdict{allow: true, rule: defaultRule, version: st.version, gen: st.gen}
	if ci.Direction == Outbound && ci.Transport == transportTCP {
		if st.policy == nil || !st.policy.Restricted() {
			return v
		}
		dst, _ := netip.ParseAddrPort(ci.Target) // set by passthrough from an AddrPort
		d := st.policy.Passthrough(ci.LocalID, dst.Addr())
		v.allow, v.rule = d.Allow, d.Name
		if !d.Allow {
			v.reason = ReasonPolicyDenied
			v.err = fmt.Errorf("%w: %s", ErrPolicyDenied, d.Reason())
		}
		return v
	}
	if ci.PeerID.IsZero() {
		return v
	}
	if ci.Direction == Outbound {
		if st.policy == nil || !st.policy.Restricted() {
			return v
		}
		src, dst := ci.LocalID, dstOf(ci)
		d := st.policy.Outbound(src, dst)
		v.allow, v.rule = d.Allow, d.Name
		if !d.Allow {
			v.reason = ReasonPolicyDenied
			v.err = fmt.Errorf("%w: %s", ErrPolicyDenied, d.Reason())
		}
		return v
	}
	allow, service := st.services.ports[ci.Port]
	if _, ok := allow[ci.PeerID]; ok {
		return v
	}
	if st.policy != nil {
		d := st.policy.Inbound(ci.PeerID, ci.Port, ci.DstID)
		v.allow, v.rule = d.Allow, d.Name
		if !d.Allow {
			v.reason = ReasonPolicyDenied
			v.err = fmt.Errorf("%w: %s", ErrPolicyDenied, d.Reason())
		}
		return v
	}
	// Services alone: the reasons they always gave.
	v.allow = false
	if service {
		v.reason = ReasonPeerNotAllowed
		v.err = fmt.Errorf("%w: %s may not reach port %d", ErrPeerNotAllowed, ci.PeerID, ci.Port)
	} else {
		v.reason = ReasonPortNotMeshed
		v.err = fmt.Errorf("%w: port %d is not a service", ErrPeerNotAllowed, ci.Port)
	}
	return v
}

// dstOf is whom an outbound connection calls: the remote agent when one is
// known at the target port, else the peer proxy.
func dstOf(ci ConnInfo) spiffeid.ID {
	if !ci.DstID.IsZero() {
		return ci.DstID
	}
	return ci.PeerID
}

// authorize decides a connection being set up by the policy in force. A
// refusal is counted and audited (audit.Authorization, result denied); the
// caller refuses with v.reason and records the setup as usual. The
// returned verdict's gen is what the connection was decided under
// (tunnelConn.authzVersion).
func (p *Proxy) authorize(ctx context.Context, ci ConnInfo) verdict {
	v := p.decide(p.authz.Load(), ci)
	if !v.allow {
		p.metrics.authzDenied.WithLabelValues(string(ci.Direction), v.rule).Inc()
		p.auditAuthz(ctx, ci, authzDenied, v)
	}
	return v
}

// Results of audit.Authorization.
const (
	authzDenied = audit.AuthzDenied // refused at setup
	authzClosed = audit.AuthzClosed // closed by SetPolicy
)

// auditAuthz logs and audits an authorization record for a connection.
func (p *Proxy) auditAuthz(ctx context.Context, ci ConnInfo, result audit.AuthzResult, v verdict) {
	src, dst := ci.PeerID, ci.DstID
	if ci.Direction == Outbound {
		src, dst = ci.LocalID, dstOf(ci)
	} else if dst.IsZero() {
		dst = p.cfg.ID // no agent at the port: the host itself is reached
	}
	rec := audit.Authorization{
		Direction: string(ci.Direction),
		Result:    result,
		SrcID:     src.String(),
		DstID:     dst.String(),
		Port:      ci.Port,
		Rule:      v.rule,
		PeerAddr:  ci.PeerAddr,
		Target:    ci.Target,
		Policy:    v.version,
	}
	// A refusal is a peer's or agent's attempt; a closure follows an
	// operator's change.
	level, msg := slog.LevelWarn, "connection not authorized"
	if result == authzClosed {
		level, msg = slog.LevelInfo, "connection closed by policy"
	}
	if p.cfg.Logger.Enabled(ctx, level) {
		p.cfg.Logger.LogAttrs(ctx, level, msg,
			slog.String(keyDirection, rec.Direction),
			slog.String(keyResult, string(rec.Result)),
			slog.String(keySrcID, rec.SrcID),
			slog.String(keyDstID, rec.DstID),
			slog.Int(keyPort, int(rec.Port)),
			slog.String(keyRule, rec.Rule),
			slog.Uint64(keyVersion, rec.Policy),
			slog.Any(keyErr, v.err))
	}
	if p.cfg.Audit == nil {
		return
	}
	if err := p.cfg.Audit.Append(rec); err != nil {
		p.cfg.Logger.LogAttrs(ctx, slog.LevelError, "audit authorization record",
			slog.String(keyDirection, rec.Direction), slog.String(keyResult, string(rec.Result)), slog.Any(keyErr, err))
	}
}

// SetPolicy makes a the authorization policy in force (nil: none; Services
// alone authorize inbound tunnels and outbound calls are unrestricted) and
// returns its version (Config.Policy is version 1, each call adds one) and
// how many live connections it closed. In force means: new handshakes
// (resumed ones included), tunnel headers and streams are decided by it from
// now on, and every established connection it no longer allows (tls
// connections and streams of pooled ones, both directions: inbound, its peer
// at its port and local agent; outbound, its local identity calling its
// destination) is closed, each with an audit.Authorization (result closed)
// and its connection record (reason policy_revoked). An inbound pooled
// connection whose peer it no longer admits at all is closed with its
// streams. Session tickets stay valid: a resumed session goes through the
// same checks (ResetTicketKeys with cause "policy" replaces them too). Safe
// for concurrent use; of two concurrent calls, the later version wins.
//
// Order, as in SetDenyList: the policy is in force before anything is
// closed, and a connection decided under an older version checks again when
// it registers, so none slips between the two.
func (p *Proxy) SetPolicy(a *policy.Authz) (version uint64, closed int) {
	p.authzMu.Lock()
	cur := p.authz.Load()
	version = cur.version + 1
	p.authz.Store(&authzState{policy: a, version: version, services: cur.services, gen: cur.gen + 1})
	p.authzMu.Unlock()
	closed = p.enforce()
	p.cfg.Logger.LogAttrs(context.Background(), slog.LevelInfo, "authorization policy applied",
		slog.Uint64(keyVersion, version), slog.Int(keyClosed, closed))
	return version, closed
}

// SetServices makes services the inbound Services in force, validated as
// Config.Services are by New (an invalid set changes nothing and returns an
// error wrapping ErrInvalidConfig), and returns how many live connections it
// closed. In force means what it means for SetPolicy: new handshakes (resumed
// ones included, which VerifyConnection checks again), tunnel headers and
// streams are decided by the new allow lists at once, and every established
// connection no longer allowed is closed, audited and recorded as SetPolicy
// closes one. Safe for concurrent use.
func (p *Proxy) SetServices(services []Service) (closed int, err error) {
	next := p.cfg
	next.Services = services
	if err := next.validate(); err != nil {
		return 0, err
	}
	set := newServiceSet(services)
	p.authzMu.Lock()
	cur := p.authz.Load()
	p.authz.Store(&authzState{policy: cur.policy, version: cur.version, services: set, gen: cur.gen + 1})
	p.authzMu.Unlock()
	closed = p.enforce()
	p.cfg.Logger.LogAttrs(context.Background(), slog.LevelInfo, "services applied",
		slog.Int(keyServices, len(services)), slog.Int(keyClosed, closed))
	return closed, nil
}

// enforce closes every established connection the authorization state in
// force no longer allows and returns how many it closed.
func (p *Proxy) enforce() (closed int) {
	// The latest state, which is a concurrent call's if it stored after
	// this one: a walk never enforces a state that has been replaced.
	st := p.authz.Load()
	type victim struct {
		c *tunnelConn
		v verdict
	}
	var victims []victim
	var muxes []*muxConn
	p.registry.mu.Lock()
	for _, c := range p.registry.conns {
		if v := p.decide(st, c.info); !v.allow {
			victims = append(victims, victim{c: c, v: v})
		}
	}
	for m := range p.registry.muxes {
		if m.dir == Inbound && !p.admits(st, m.peerID) {
			muxes = append(muxes, m)
		}
	}
	p.registry.mu.Unlock()
	ctx := context.Background()
	for _, x := range victims {
		if p.revokeByPolicy(ctx, x.c, x.v) {
			closed++
		}
	}
	// Their streams, none of which the policy allows, are closed and
	// recorded above.
	for _, m := range muxes {
		m.close(false)
	}
	return closed
}

// revokeByPolicy closes c, which the policy of v no longer allows, and
// audits that, unless c has ended meanwhile. It reports whether it closed c.
func (p *Proxy) revokeByPolicy(ctx context.Context, c *tunnelConn, v verdict) bool {
	if !c.end(connPolicyRevoked) {
		return false
	}
	p.auditAuthz(ctx, c.info, authzClosed, v)
	return true
}

// recheckPolicy closes c, just registered, if it was decided under a policy
// or Services that have been replaced since and those in force do not allow
// it.
func (p *Proxy) recheckPolicy(ctx context.Context, c *tunnelConn) {
	st := p.authz.Load()
	if st.gen == c.authzVersion {
		return
	}
	if v := p.decide(st, c.info); !v.allow {
		p.revokeByPolicy(ctx, c, v)
	}
}
