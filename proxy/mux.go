package proxy

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// muxState is the life of a pooled connection.
type muxState int

const (
	muxOpen    muxState = iota
	muxRetired          // takes no new streams; closes after its last one
	muxClosed           // closing or gone: takes nothing
)

// muxConn is one pooled connection.
type muxConn struct {
	p           *Proxy
	impl        muxImpl
	transport   string
	dir         Direction
	key         poolKey // outbound only
	peerID      spiffeid.ID
	peerSerial  string
	localID     spiffeid.ID // the identity we presented: the host's, or outbound an agent's
	localSerial string
	peerAddr    string

	// peerNotBefore and localNotBefore go with peerSerial and localSerial.
	peerNotBefore, localNotBefore time.Time

	// Fixed at the handshake: its name in audit records (audit.Handshake.ConnID),
	// the NotAfter of the peer's leaf and of ours, and its time limits.
	id            string
	peerNotAfter  time.Time
	localNotAfter time.Time
	limits        muxLimits

	bytes atomic.Int64 // payload carried by its streams, both ways

	mu        sync.Mutex
	cond      sync.Cond // on mu: signalled when active drops to 0
	state     muxState
	opened    int         // streams ever reserved
	active    int         // streams not ended yet
	idleSince time.Time   // when active last dropped to 0
	linger    *time.Timer // pending graceful close
	expiry    *time.Timer // moves it to draining at limits.usableUntil (startExpiry)
	gone      bool        // closed has run

	closedOnce sync.Once
}

func (p *Proxy) newMux(impl muxImpl, s *setup, peerID spiffeid.ID) *muxConn {
	m := &muxConn{
		p:           p,
		impl:        impl,
		transport:   s.transport,
		dir:         s.dir,
		peerID:      peerID,
		peerSerial:  s.peerSerial,
		localID:     s.presented(p),
		localSerial: s.localSerial,
		peerAddr:    s.peerAddr,
		idleSince:   time.Now(),

		peerNotBefore:  s.peerNotBefore,
		localNotBefore: s.localNotBefore,
	}
	m.id, m.peerNotAfter, m.localNotAfter = s.connID, s.peerNotAfter, s.localNotAfter
	m.limits = newMuxLimits(p.cfg.Now(), p.cfg.PoolMaxLifetime, s.localNotAfter, s.peerNotAfter)
	m.cond.L = &m.mu
	return m
}

// register makes m known to revocation and drain, and counts it. If the
// deny-list denies m's credentials, or Drain has just drained our
// certificate on it (its setup picked it before the drain), it closes m and
// returns why: ReasonRevoked or ReasonDrained.
func (m *muxConn) register() Reason {
	m.p.metrics.pool.WithLabelValues(string(m.dir), m.transport).Inc()
	// As for connections (serve): SetDenyList stores the list before it
	// walks the registry, Drain marks the serial as it walks it.
	drained := m.p.registry.addMux(m, time.Now())
	switch {
	case m.p.deniedConn(m.info()):
		m.close(false)
		return ReasonRevoked
	case drained:
		m.close(false)
		return ReasonDrained
	}
	m.startExpiry()
	return ""
}

// info describes m as ConnInfo does a connection, for the deny-list.
func (m *muxConn) info() ConnInfo {
	return ConnInfo{Direction: m.dir, PeerID: m.peerID, PeerSerial: m.peerSerial, LocalID: m.localID,
		LocalSerial: m.localSerial, PeerAddr: m.peerAddr, Transport: m.transport,
		PeerNotBefore: m.peerNotBefore, LocalNotBefore: m.localNotBefore}
}

// reserve takes a stream slot on an open outbound connection within the
// limits. A connection past its usable time (muxLimits) or PoolMaxBytes is
// retired; closeNow reports that it has no stream left, so the caller
// (holding no lock) must start closing it. One with PoolMaxStreams open
// streams has no slot now.
func (m *muxConn) reserve() (ok, closeNow bool) {
	now := m.p.cfg.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.state != muxOpen {
		return false, false
	}
	end := ""
	switch {
	case !m.limits.usableAt(now):
		end = m.limits.endReason
	case m.bytes.Load() >= m.p.cfg.PoolMaxBytes:
		end = poolEndMaxBytes
	}
	if end != "" {
		m.state = muxRetired
		m.p.metrics.poolEnded.WithLabelValues(string(m.dir), m.transport, end).Inc()
		return false, m.active == 0
	}
	if m.active >= m.p.cfg.PoolMaxStreams {
		return false, false
	}
	m.opened++
	m.active++
	return true, false
}

// acquire admits a stream the peer opened on an inbound connection; false
// once the connection is closing.
func (m *muxConn) acquire() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.state == muxClosed {
		return false
	}
	m.opened++
	m.active++
	return true
}

// release ends a stream's slot (reserved or acquired). The last stream of a
// retired outbound connection starts its graceful close.
func (m *muxConn) release() {
	m.mu.Lock()
	m.active--
	last := m.active == 0
	if last {
		m.idleSince = time.Now()
		m.cond.Broadcast()
	}
	retiring := last && m.state == muxRetired
	m.mu.Unlock()
	if retiring {
		m.lingerClose()
	}
}

// retire stops m from taking new streams; it closes after its last one.
func (m *muxConn) retire() { m.retireFor("") }

// retireFor is retire counting why in agentmesh_proxy_pool_ended_total
// (nothing for ""), once: only the transition counts.
func (m *muxConn) retireFor(end string) {
	m.mu.Lock()
	if m.state != muxOpen {
		m.mu.Unlock()
		return
	}
	m.state = muxRetired
	if end != "" {
		m.p.metrics.poolEnded.WithLabelValues(string(m.dir), m.transport, end).Inc()
	}
	idle := m.active == 0
	m.mu.Unlock()
	if idle {
		m.lingerClose()
	}
}

// lingerClose closes m gracefully muxCloseLinger from now (see there).
func (m *muxConn) lingerClose() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.state == muxClosed || m.linger != nil {
		return
	}
	m.linger = time.AfterFunc(muxCloseLinger, func() { m.close(true) })
}

// close ends m: it takes nothing from now on, and the transport closes it
// (gracefully: h2 GOAWAY; else at once). Idempotent.
func (m *muxConn) close(graceful bool) {
	m.mu.Lock()
	if m.state == muxClosed {
		m.mu.Unlock()
		return
	}
	m.state = muxClosed
	m.stopTimers()
	m.mu.Unlock()
	m.impl.close(graceful)
}

// stopTimers stops m's pending linger and expiry; m.mu is held.
func (m *muxConn) stopTimers() {
	if m.linger != nil {
		m.linger.Stop()
	}
	if m.expiry != nil {
		m.expiry.Stop()
	}
}

// closed is called by the transport when the connection is gone: m leaves
// the registry and the pool. The transport may report the end from two
// goroutines at once (quic: its own close and the end of the connection's
// context); every call returns only once m is gone, so that a caller that
// closed m (SetDenyList, Drain) finds it gone.
func (m *muxConn) closed() { m.closedOnce.Do(m.leave) }

func (m *muxConn) leave() {
	m.mu.Lock()
	m.gone = true
	m.state = muxClosed
	m.stopTimers()
	m.mu.Unlock()
	m.p.registry.removeMux(m)
	if m.dir == Outbound {
		m.p.pool.remove(m)
	}
	m.p.metrics.pool.WithLabelValues(string(m.dir), m.transport).Dec()
}

// waitStreams blocks until no stream of m is active. Only for a connection
// that admits no new ones (closed).
func (m *muxConn) waitStreams() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for m.active > 0 {
		m.cond.Wait()
	}
}
