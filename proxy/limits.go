package proxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Limits on what an unauthenticated peer can make the proxy hold (docs/limits.md). The
// defaults are far above what a host's own agents and peers use (a busy host keeps a few
// hundred tunnels open, and a handshake lasts a millisecond or two), and well below what
// exhausts a proxy: each connection costs two file descriptors (tunnel and target) and a
// few tens of KiB, each handshake in flight a goroutine and its CPU.
const (
	// DefaultMaxConnections: 4,096 connections need about 8,200 descriptors, within the
	// 65,536 that systemd and container runtimes grant (Go raises the soft limit to the
	// hard one), and about 200 MiB at worst.
	DefaultMaxConnections = 4096
	// DefaultMaxHandshakes: 256 handshakes in flight keep two cores busy for about half a
	// second at loopback speed: a burst of legitimate reconnections (a peer restarting)
	// fits, a flood of handshakes is cut off without starving established tunnels.
	DefaultMaxHandshakes = 256
	// DefaultRefusalInterval and DefaultRefusalSources bound the audit records of refused
	// pre-authentication attempts to 257 per 10 s (about 25 per second) in the worst case,
	// a distributed flood, and to one per 10 s per source otherwise.
	DefaultRefusalInterval = 10 * time.Second
	DefaultRefusalSources  = 256
)

// errOverLimit is the cause recorded with ReasonMaxConnections and ReasonMaxHandshakes.
var errOverLimit = fmt.Errorf("proxy: over limit")

// awaitHello waits, within the deadline already set on raw, for the first byte of the
// peer's handshake and returns a connection that reads it again. Only then does the
// handshake take one of the MaxHandshakes slots: a silent connection costs a descriptor
// until HandshakeTimeout, never a handshake slot.
func awaitHello(raw net.Conn) (net.Conn, error) {
	var b [1]byte
	if _, err := io.ReadFull(raw, b[:]); err != nil {
		return nil, err
	}
	return &replayConn{Conn: raw, first: b[0], pending: true}, nil
}

// replayConn is a net.Conn whose first Read returns the byte awaitHello consumed.
type replayConn struct {
	net.Conn
	first   byte
	pending bool
}

func (c *replayConn) Read(p []byte) (int, error) {
	if c.pending && len(p) > 0 {
		p[0], c.pending = c.first, false
		return 1, nil
	}
	return c.Conn.Read(p)
}

// quicAdmit is the quic transport's share of the limits, called by quic-go for every new
// inbound connection before its handshake runs (Transport.ConnContext): it takes a
// connection slot and a handshake slot, or refuses the connection (quic-go answers
// CONNECTION_REFUSED). The slots are released by quicSlots.
func (p *Proxy) quicAdmit(addr net.Addr) (*quicSlots, error) {
	if err := p.auditErr(); err != nil {
		p.refuseEarly(Inbound, addr.String(), TransportQUIC, ReasonAuditUnavailable)
		return nil, err
	}
	if !p.limit.TryAcquire() {
		p.refuseEarly(Inbound, addr.String(), TransportQUIC, ReasonMaxConnections)
		return nil, errOverLimit
	}
	if !p.handshakes.TryAcquire() {
		p.limit.Release()
		p.refuseEarly(Inbound, addr.String(), TransportQUIC, ReasonMaxHandshakes)
		return nil, errOverLimit
	}
	return &quicSlots{
		handshake: sync.OnceFunc(p.handshakes.Release),
		conn:      sync.OnceFunc(p.limit.Release),
	}, nil
}

// quicSlots are the slots an inbound quic connection holds: the handshake slot until its
// handshake ends (serveQUICConn accepts it, or it fails), the connection slot until the
// connection ends. Each release runs once.
type quicSlots struct {
	handshake, conn func()
}

// hold releases both slots when ctx, the context quic-go cancels as the connection ends,
// is done.
func (q *quicSlots) hold(ctx context.Context) {
	context.AfterFunc(ctx, func() {
		q.handshake()
		q.conn()
	})
}
