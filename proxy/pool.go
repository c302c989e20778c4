package proxy

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/singleflight"
)

// Pooled transports (h2, quic) carry many agent connections, one stream
// each, over one long-lived connection between two proxies. A muxConn is
// such a connection, in either direction; the pool holds the outbound ones.
//
// Streams are registered connections like any other (ConnInfo with the
// pooled connection's serials), so CloseWhere, SetDenyList and Drain reach
// them; the pooled connections are registered too, so that a denied or
// drained credential also ends the connection its streams ran on.

// muxCloseLinger is how long an outbound pooled connection that takes no new
// streams stays open after its last stream ended, so that the peer receives
// and acknowledges what that stream sent last before the connection goes:
// closing at once could discard it (QUIC) or reset it (TCP with unread
// input). x/net's HTTP/2 server waits as long after a GOAWAY.
const muxCloseLinger = time.Second

// errMuxUnusable means a pooled connection takes no new streams (the peer
// sent GOAWAY, or it is closing): nothing was sent, another one may be tried.
var errMuxUnusable = errors.New("pooled connection takes no new streams")

// muxImpl is the transport side of a pooled connection. Its methods are
// never called with a lock of ours held: the transport calls back
// (muxConn.closed) from its own goroutines, under its own locks.
type muxImpl interface {
	// open starts a stream asking for port on an outbound connection, or
	// fails with errMuxUnusable having sent nothing.
	open(ctx context.Context, port uint16) (outStream, error)
	// goaway asks the peer of an inbound connection to open no new
	// streams on it, without refusing any: the open ones, and those the
	// peer opens before it gets the message, are served.
	goaway()
	// close ends the connection; graceful lets the transport finish what
	// is queued (h2 sends GOAWAY first), else it ends at once. Either way
	// the transport calls muxConn.closed once the connection is gone.
	close(graceful bool)
	// bind names the muxConn to call closed on; if the connection is
	// already gone, bind calls it at once.
	bind(m *muxConn)
}

// outStream is one outbound stream, from open until it ends.
type outStream interface {
	halfConn
	// status sends what the stream still holds back (h2: the request) and
	// waits, at most timeout, for the peer's answer.
	status(timeout time.Duration) (status, error)
}

// inStream is one inbound stream.
type inStream interface {
	halfConn
	// answer tells the peer our status. A refusal also ends the stream
	// gracefully: the peer reads the status and then the end of the
	// stream, and what it sent is discarded. Close resets a stream
	// without an answer.
	answer(st status) error
}

// poolKey names the outbound pooled connections that may carry a stream:
// same transport, the local identity presented (so one agent never rides
// another's connection, or the host's) and its certificate (the one current
// when the stream starts), the peer identity the connection verified, and
// the peer's address.
type poolKey struct {
	transport string
	localID   spiffeid.ID // the identity presented: the host's or an agent's
	local     string      // our certificate's serial
	peer      spiffeid.ID
	addr      string
}

// String names k for the dial group: its fields joined by a space, which
// none of them can contain.
func (k poolKey) String() string {
	return k.transport + " " + k.localID.String() + " " + k.local + " " + k.peer.String() + " " + k.addr
}

// pool holds the outbound pooled connections.
type pool struct {
	p     *Proxy
	mu    sync.Mutex
	conns map[poolKey][]*muxConn // usable or finishing, oldest first; guarded by mu
	// dials runs one dial per key at a time: the others that need the
	// same key wait for it rather than dial too.
	dials singleflight.Group
	// current is each identity's local serial of its newest open; guarded
	// by mu.
	current map[spiffeid.ID]string
	// tasks are per-connection goroutines (quic control streams), waited
	// for by Run once every connection is closed.
	tasks sync.WaitGroup
}

// open starts a stream to port on a pooled connection to peer with l's
// identity and certificate, dialing one if none can take it. The stream's
// slot is the caller's: it must call release on the returned muxConn.
func (pl *pool) open(ctx context.Context, l *localTLS, peer Peer, transport string, port uint16) (*muxConn, outStream, error) {
	key := poolKey{transport: transport, localID: l.id, local: l.serial, peer: peer.ID, addr: peer.Tunnel}
	// A connection may turn out unusable between reserve and open (a
	// GOAWAY in flight); nothing was sent then, so another is tried.
	for attempt := 0; ; attempt++ {
		m, err := pl.get(ctx, key, l, peer)
		if err != nil {
			return nil, nil, err
		}
		st, err := m.impl.open(ctx, port)
		if err == nil {
			return m, st, nil
		}
		m.retire()
		m.release()
		if !errors.Is(err, errMuxUnusable) || attempt == 2 {
			return nil, nil, err
		}
	}
}

// get reserves a slot on a connection for key, dialing one when none has
// room. Concurrent callers for one key share one dial.
func (pl *pool) get(ctx context.Context, key poolKey, l *localTLS, peer Peer) (*muxConn, error) {
	dials := 0
	for {
		if m := pl.reserve(key); m != nil {
			return m, nil
		}
		// Do, not DoChan: the dial runs in the goroutine of the
		// connection that needed it, which Run waits for. Every caller
		// shares Run's context, so a waiter is not held past the dial's
		// own cancellation.
		var dialer bool
		var m *muxConn
		_, err, _ := pl.dials.Do(key.String(), func() (any, error) {
			dialer = true
			var err error
			m, err = pl.dial(ctx, key, l, peer)
			return nil, err
		})
		switch {
		case err != nil:
			return nil, err
		case m != nil:
			return m, nil // the dialer's slot
		case !dialer:
			continue // the new connection may already be full
		}
		if dials++; dials == 3 {
			return nil, fmt.Errorf("%w: %s connections to %s close as soon as they open", errMuxUnusable, key.transport, key.addr)
		}
	}
}

// reserve reserves a slot on a pooled connection for key, or returns nil
// when none has room. A change of the identity's certificate first retires
// its connections that present another one.
func (pl *pool) reserve(key poolKey) *muxConn {
	var finish, idle []*muxConn
	var found *muxConn
	pl.mu.Lock()
	if key.local != pl.current[key.localID] {
		pl.current[key.localID] = key.local
		for k, ms := range pl.conns {
			if k.localID == key.localID && k.local != key.local {
				finish = append(finish, ms...)
			}
		}
	}
	for _, m := range pl.conns[key] {
		ok, closeNow := m.reserve()
		if closeNow {
			idle = append(idle, m)
		}
		if ok {
			found = m
			break
		}
	}
	pl.mu.Unlock()
	for _, m := range finish {
		m.retire()
	}
	for _, m := range idle {
		m.lingerClose()
	}
	return found
}

// dial dials a connection for key and pools it with one slot reserved, the
// dialer's. A fresh connection already gone is not pooled (its closed has
// run, or runs after this and removes it): dial then returns nil, nil.
func (pl *pool) dial(ctx context.Context, key poolKey, l *localTLS, peer Peer) (*muxConn, error) {
	m, err := pl.p.dialMux(ctx, key, l, peer)
	if err != nil {
		return nil, err
	}
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if ok, _ := m.reserve(); !ok {
		return nil, nil
	}
	pl.conns[key] = append(pl.conns[key], m)
	return m, nil
}

// remove forgets m, which is gone.
func (pl *pool) remove(m *muxConn) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	ms := pl.conns[m.key]
	for i, x := range ms {
		if x == m {
			ms = append(ms[:i], ms[i+1:]...)
			break
		}
	}
	if len(ms) == 0 {
		delete(pl.conns, m.key)
	} else {
		pl.conns[m.key] = ms
	}
}

// retireMuxes makes every pooled connection stop taking new streams.
func (p *Proxy) retireMuxes() {
	for _, m := range p.registry.allMuxes() {
		if m.dir == Outbound {
			m.retire()
		} else {
			m.impl.goaway()
		}
	}
}

// reap closes, every tick until ctx is done, the pooled connections that
// carried no stream for PoolIdleTimeout (inbound: plus muxIdleGrace); then
// it closes every pooled connection (both directions) at once, as Run's
// shutdown does with every other connection.
func (p *Proxy) reap(ctx context.Context) {
	tick := min(p.cfg.PoolIdleTimeout/4, 10*time.Second)
	t := time.NewTicker(max(tick, 100*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			for _, m := range p.registry.allMuxes() {
				m.close(false)
			}
			return
		case now := <-t.C:
			for _, m := range p.registry.allMuxes() {
				idle := p.cfg.PoolIdleTimeout
				if m.dir == Inbound {
					idle += muxIdleGrace
				}
				if m.closeIfIdle(now.Add(-idle)) {
					p.metrics.poolEnded.WithLabelValues(string(m.dir), m.transport, poolEndIdle).Inc()
				}
			}
		}
	}
}

// dialMux dials a pooled connection for key: TCP or UDP, handshake, and
// the peer's confirmation that it accepted us. The outcome is recorded as
// one handshake (success or failure) of key.transport. A failure is a
// *refusal carrying the recorded reason, so the streams that waited for
// this dial end with the same one.
func (p *Proxy) dialMux(ctx context.Context, key poolKey, l *localTLS, peer Peer) (*muxConn, error) {
	s := &setup{dir: Outbound, start: time.Now(), peerAddr: peer.Tunnel, transport: key.transport, localID: l.id, connID: newConnID()}
	var impl muxImpl
	err := p.auditErr()
	if err == nil {
		switch key.transport {
		case TransportH2:
			impl, err = p.dialH2(ctx, s, l, peer)
		case TransportQUIC:
			impl, err = p.dialQUIC(ctx, s, l, peer)
		default:
			err = fmt.Errorf("transport %q is not pooled", key.transport)
		}
	}
	var reason Reason
	if err != nil {
		reason = classify(ctx, err)
		if errors.Is(err, ErrAuditUnavailable) {
			reason = ReasonAuditUnavailable
		}
	}
	if rerr := p.record(ctx, s, reason, err); rerr != nil && err == nil {
		impl.close(false)
		reason, err = ReasonAuditUnavailable, rerr
	}
	if err != nil {
		return nil, &refusal{reason: reason, peerID: s.peerID, peerSerial: s.peerSerial,
			err: fmt.Errorf("%s connection to %s: %w", key.transport, peer.Tunnel, err)}
	}
	m := p.newMux(impl, s, peer.ID)
	m.key = key
	impl.bind(m)
	if reason := m.register(); reason != "" {
		return nil, &refusal{reason: reason, peerID: s.peerID, peerSerial: s.peerSerial,
			err: fmt.Errorf("%s connection to %s: %w: credential %s meanwhile", key.transport, peer.Tunnel, ErrRevoked, reason)}
	}
	return m, nil
}
