package proxy

import (
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Direction says which side opened a proxied connection.
type Direction string

const (
	// Inbound connections arrive from a peer proxy on the tunnel port and
	// are delivered to a local Service.
	Inbound Direction = "inbound"
	// Outbound connections arrive from a local agent (on a Route or a
	// capture listener) and are tunnelled to a peer proxy, or passed
	// through to their destination.
	Outbound Direction = "outbound"
)

// ConnInfo describes a live proxied connection. It is a copy; changing it
// changes nothing.
type ConnInfo struct {
	Direction Direction
	// PeerID and PeerSerial identify the certificate the peer proxy
	// authenticated with (serial in decimal, as step-ca prints it). Both
	// are zero for a passthrough connection, which has no peer proxy.
	PeerID     spiffeid.ID
	PeerSerial string
	// PeerNotBefore and LocalNotBefore are the NotBefore of those two
	// certificates: an identity's revocation denies its certificates
	// issued before it, which a proxy tells by NotBefore.
	PeerNotBefore, LocalNotBefore time.Time
	// LocalID is the identity this proxy presented on the connection: the
	// host's (Config.ID; every inbound connection), or outbound the local
	// agent's the connection was attested to. Zero for a passthrough
	// connection.
	LocalID spiffeid.ID
	// LocalSerial is the serial (decimal) of the SVID this proxy presented
	// on the connection; for a resumed session, the one presented in the
	// handshake it resumes. Zero for a passthrough connection.
	LocalSerial string
	// DstID is the agent the connection reaches, when one is registered at
	// the target port: outbound, the remote agent (Peer.Agents); inbound,
	// the local one (Agents.ByPort). Zero when none is known.
	DstID spiffeid.ID
	// PeerAddr is the peer proxy's address (for passthrough, the
	// destination's).
	PeerAddr string
	// Port is the target port: the one the tunnel header (or stream)
	// names, or a passthrough connection's destination port.
	Port uint16
	// Target is where the bytes go: the local host:port for inbound
	// connections; outbound, the original destination of a captured
	// connection, or the peer's host with Route.TargetPort for a Route.
	Target string
	// Start is when the connection was accepted.
	Start time.Time
	// Transport is TransportTLS, TransportH2 or TransportQUIC (for h2
	// and quic the connection is one stream of a pooled connection, whose
	// serials it shares), or "tcp" for a passthrough connection.
	Transport string
	// ConnID names, for a stream, its pooled connection in audit records
	// (audit.Handshake.ConnID); "" otherwise.
	ConnID string
	// PeerNotAfter and LocalNotAfter are, for a stream, the NotAfter of
	// the peer's leaf and of ours on its pooled connection; zero otherwise.
	PeerNotAfter  time.Time
	LocalNotAfter time.Time
}

// registry tracks established proxied connections so that revocation and
// drain can close the ones a credential authenticated.
type registry struct {
	mu    sync.Mutex
	next  uint64
	conns map[uint64]*tunnelConn
	// drained maps a local serial that Drain has closed to the (real)
	// time until which a connection registering with it is closed at
	// once: see Drain.
	drained map[string]time.Time
	// muxes are the pooled connections (h2, quic), both directions.
	muxes map[*muxConn]struct{}
}

// add registers c and reports whether its local serial has been drained
// (at now), in which case the caller must close it.
func (r *registry) add(c *tunnelConn, now time.Time) (id uint64, drained bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conns == nil {
		r.conns = make(map[uint64]*tunnelConn)
	}
	r.next++
	r.conns[r.next] = c
	until, marked := r.drained[c.info.LocalSerial]
	return r.next, marked && now.Before(until)
}

// addMux registers a pooled connection and reports whether its local
// serial has been drained (at now), in which case the caller must close it.
// A connection already gone is not registered.
func (r *registry) addMux(m *muxConn, now time.Time) (drained bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	m.mu.Lock()
	gone := m.gone
	m.mu.Unlock()
	if !gone {
		if r.muxes == nil {
			r.muxes = make(map[*muxConn]struct{})
		}
		r.muxes[m] = struct{}{}
	}
	until, marked := r.drained[m.localSerial]
	return marked && now.Before(until)
}

func (r *registry) removeMux(m *muxConn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.muxes, m)
}

// allMuxes returns every registered pooled connection.
func (r *registry) allMuxes() []*muxConn {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*muxConn, 0, len(r.muxes))
	for m := range r.muxes {
		out = append(out, m)
	}
	return out
}

func (r *registry) remove(id uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.conns, id)
}

// CloseWhere closes every established proxied connection for which match
// returns true and returns how many it closed. match runs under the
// registry lock: it must be quick and must not call back into the Proxy.
// Closing (socket I/O) happens after the lock is released. Each closed
// connection is audited with reason "closed". Connections still in their
// handshake are not covered; they are bounded by HandshakeTimeout.
// Revocation uses SetDenyList and the end of a credential's overlap uses
// Drain, which also cover those. Safe for concurrent use.
func (p *Proxy) CloseWhere(match func(ConnInfo) bool) int {
	var victims []*tunnelConn
	p.registry.mu.Lock()
	for _, c := range p.registry.conns {
		if match(c.info) {
			victims = append(victims, c)
		}
	}
	p.registry.mu.Unlock()
	for _, c := range victims {
		c.abort()
	}
	return len(victims)
}

// Connections returns a snapshot of the established proxied connections, in
// no particular order. Safe for concurrent use.
func (p *Proxy) Connections() []ConnInfo {
	p.registry.mu.Lock()
	defer p.registry.mu.Unlock()
	out := make([]ConnInfo, 0, len(p.registry.conns))
	for _, c := range p.registry.conns {
		out = append(out, c.info)
	}
	return out
}
