package proxy

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"maps"
	"net"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/sockowner"
)

// Agents are the local agents a proxy holds identities for (Config.Agents),
// as the host's registration entries list them.
type Agents interface {
	// ByUID returns the agent registered for uid on this host and its
	// credentials (TLSCertificate only is used from them; trust bundles
	// always come from Config.Credentials). Hot path: no I/O, no blocking,
	// safe for concurrent use.
	ByUID(uid uint32) (spiffeid.ID, Credentials, bool)
	// ByPort returns the local agent registered on port. Same contract as
	// ByUID.
	ByPort(port uint16) (spiffeid.ID, bool)
}

// UnattestedPolicy is what the proxy does with a captured connection that
// cannot be attributed to a registered agent (Config.Unattested).
type UnattestedPolicy int

const (
	// UnattestedDeny refuses the connection and audits the refusal
	// (reason unattested): only registered agents reach the mesh. The
	// default, so that a process nobody registered never borrows the
	// host's identity unless an operator chose that.
	UnattestedDeny UnattestedPolicy = iota
	// UnattestedHost carries the connection under the host identity:
	// processes that are not agents keep working as with no agents at all.
	UnattestedHost
)

// String returns "deny" or "host".
func (u UnattestedPolicy) String() string {
	switch u {
	case UnattestedDeny:
		return "deny"
	case UnattestedHost:
		return "host"
	default:
		return fmt.Sprintf("UnattestedPolicy(%d)", int(u))
	}
}

// identity is a local identity outbound tunnels present: the host's or a
// local agent's.
type identity struct {
	id    spiffeid.ID
	creds Credentials // only TLSCertificate is used
}

// host is the host identity.
func (p *Proxy) host() identity { return identity{id: p.cfg.ID, creds: p.cfg.Credentials} }

// attest attributes a captured connection to the identity it is carried
// under: the agent registered for the uid owning the agent's socket, else
// the host, or under UnattestedDeny nobody (a refusal, reason unattested).
// remote is where the agent's socket points: the original destination of a
// REDIRECTed connection (REDIRECT rewrites only the proxy's view), else the
// listener it connected to. A failed lookup counts as unattested: the
// proxy cannot vouch for a process it cannot name.
func (p *Proxy) attest(agent net.Conn, remote netip.AddrPort) (identity, error) {
	if p.cfg.Agents == nil {
		return p.host(), nil
	}
	// The kernel reports a dual-stack listener's IPv4 clients as mapped
	// addresses, and SO_ORIGINAL_DST gives plain IPv4: one form for both.
	local := addrPortOf(agent.RemoteAddr())
	remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	uid, err := sockowner.UID(local, remote)
	if err == nil {
		if id, creds, ok := p.cfg.Agents.ByUID(uid); ok {
			p.metrics.attestAgent.Inc()
			return identity{id: id, creds: creds}, nil
		}
		err = fmt.Errorf("uid %d is not a registered agent's", uid)
	}
	if p.cfg.Unattested == UnattestedDeny {
		p.metrics.attestRefused.Inc()
		return identity{}, &refusal{reason: ReasonUnattested,
			err: fmt.Errorf("%w: connection from %s: %w", ErrUnattested, local, err)}
	}
	p.metrics.attestHost.Inc()
	return p.host(), nil
}

// agentAt is the local agent registered at port, zero when none.
func (p *Proxy) agentAt(port uint16) spiffeid.ID {
	if p.cfg.Agents == nil {
		return spiffeid.ID{}
	}
	id, _ := p.cfg.Agents.ByPort(port)
	return id
}

// local returns the configurations for the host's current SVID.
func (p *Proxy) local() (*localTLS, error) { return p.localFor(p.host()) }

// localFor returns the configurations for who's current SVID, building them
// when that SVID changed. A missing SVID is a no_svid refusal, one that the
// deny-list in force denies a revoked refusal: neither is presented, and an
// agent without an SVID never falls back to the host's.
func (p *Proxy) localFor(who identity) (*localTLS, error) {
	if who.creds == nil {
		return nil, &refusal{reason: ReasonNoSVID, err: fmt.Errorf("%w: no credentials for %s", ErrNoSVID, who.id)}
	}
	cert, err := who.creds.TLSCertificate()
	if err != nil {
		return nil, &refusal{reason: ReasonNoSVID, err: fmt.Errorf("%w: %s: %w", ErrNoSVID, who.id, err)}
	}
	var l *localTLS
	if m := p.locals.Load(); m != nil {
		l = (*m)[who.id]
	}
	if l == nil || !l.holds(cert) {
		if l, err = p.rebuildLocal(who.id, cert); err != nil {
			return nil, err
		}
	}
	if p.denies(who.id, l.serial, l.leaf.NotBefore) {
		return nil, &refusal{reason: ReasonRevoked,
			err: fmt.Errorf("%w: our own SVID for %s (serial %s)", ErrRevoked, who.id, l.serial)}
	}
	return l, nil
}

// rebuildLocal builds and publishes the configurations for id's
// certificate cert, unless a concurrent handshake already did. Identities
// whose certificate has expired are dropped on the way (an unregistered
// agent's, say), so the set stays as large as the live identities.
func (p *Proxy) rebuildLocal(id spiffeid.ID, cert *tls.Certificate) (*localTLS, error) {
	p.localMu.Lock()
	defer p.localMu.Unlock()
	old := p.locals.Load()
	if old != nil {
		if l := (*old)[id]; l != nil && l.holds(cert) {
			return l, nil
		}
	}
	leaf := cert.Leaf
	if leaf == nil {
		if len(cert.Certificate) == 0 {
			return nil, &refusal{reason: ReasonNoSVID, err: fmt.Errorf("%w: %s: empty certificate", ErrNoSVID, id)}
		}
		var err error
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, &refusal{reason: ReasonNoSVID, err: fmt.Errorf("%w: %s: %w", ErrNoSVID, id, err)}
		}
	}
	l := &localTLS{
		id:      id,
		cert:    cert,
		leaf:    leaf,
		serial:  leaf.SerialNumber.String(),
		digest:  sha256.Sum256(leaf.Raw),
		clients: make(map[clientKey]*tls.Config),
	}
	// Inbound tunnels present the host identity only.
	if id == p.cfg.ID {
		l.server = p.serverTLSConfig(l)
	}
	now := p.cfg.Now()
	next := make(map[spiffeid.ID]*localTLS, 1)
	if old != nil {
		maps.Copy(next, *old)
		maps.DeleteFunc(next, func(_ spiffeid.ID, x *localTLS) bool { return now.After(x.leaf.NotAfter) })
	}
	next[id] = l
	p.locals.Store(&next)
	return l, nil
}

// dropSessions forgets the configurations of every identity, and with them
// every client session cache: the next handshake builds new ones.
// Handshakes in flight finish on the old ones, whose caches nobody reads
// again.
func (p *Proxy) dropSessions() {
	p.localMu.Lock()
	defer p.localMu.Unlock()
	p.locals.Store(nil)
}
