package proxy

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agentmesh/agentmesh/audit"
)

// spliceBufferSize is the copy buffer per direction: two TLS records (16 KiB
// each), small enough to keep many idle connections. Nine bytes less, so
// that an h2 DATA frame of this size with its 9-byte header fills exactly
// two records rather than spilling a third, tiny one.
const spliceBufferSize = 2*16384 - 9

// tunnelConn is one proxied connection: a TLS tunnel to a peer proxy (or,
// for passthrough, a plain TCP connection to the destination) and a plain
// TCP connection to the local agent (outbound) or target (inbound).
type tunnelConn struct {
	p      *Proxy
	info   ConnInfo // immutable once registered
	tunnel halfConn // *tls.Conn, a stream of mux, or *net.TCPConn for passthrough
	local  net.Conn // set before the copiers start
	mux    *muxConn // the pooled connection a stream runs on; nil for tls and passthrough
	// authzVersion is the version of the policy the connection was
	// authorized under; serve checks again if it has changed since.
	authzVersion uint64

	in  atomic.Int64 // bytes read from the tunnel (peer to local)
	out atomic.Int64 // bytes written to the tunnel (local to peer)

	copiers sync.WaitGroup

	mu      sync.Mutex
	sockets []net.Conn // everything that must be closed at the end
	state   connState
}

// halfConn is a connection that can end its sending side alone: TLS sends
// close_notify, TCP sends FIN.
type halfConn interface {
	net.Conn
	CloseWrite() error
}

// connState is how a connection ended; the first transition wins.
type connState int

const (
	connOpen          connState = iota
	connDone                    // both directions ended with EOF
	connFailed                  // a copier hit an I/O error
	connAborted                 // CloseWhere or shutdown closed it
	connRevoked                 // the deny-list denied one of its credentials
	connDrained                 // Drain closed it: our credential on it was superseded
	connPolicyRevoked           // SetPolicy closed it: the policy no longer allows it
)

// attach adds a socket to close at the end. If the connection has already
// ended it closes s at once and reports false: the caller must give up.
func (c *tunnelConn) attach(s net.Conn) bool {
	c.mu.Lock()
	open := c.state == connOpen
	if open {
		c.sockets = append(c.sockets, s)
	}
	c.mu.Unlock()
	if !open {
		_ = s.Close()
	}
	return open
}

// abort closes the connection from outside (CloseWhere, shutdown, a refused
// setup). Closing the sockets unblocks every Read and Write on them.
func (c *tunnelConn) abort() { c.end(connAborted) }

// revoke closes the connection because the deny-list denies one of its
// credentials, and counts it. It reports whether the connection was still
// open (a connection that ended on its own meanwhile is not counted).
func (c *tunnelConn) revoke() bool {
	if !c.end(connRevoked) {
		return false
	}
	c.p.metrics.revoked.WithLabelValues(string(c.info.Direction)).Inc()
	return true
}

// drain closes the connection because the credential this proxy presented
// on it has been drained, and counts it. It reports whether the connection
// was still open.
func (c *tunnelConn) drain() bool {
	if !c.end(connDrained) {
		return false
	}
	c.p.metrics.drained.WithLabelValues(string(c.info.Direction)).Inc()
	return true
}

// fail records an I/O error and closes everything so the other direction
// stops too.
func (c *tunnelConn) fail() { c.end(connFailed) }

// finish closes a connection whose copiers have both returned.
func (c *tunnelConn) finish() { c.end(connDone) }

// end records why the connection ended (first caller wins, and only it gets
// true) and closes every socket. It closes the raw TCP connection rather
// than the tls.Conn because tls.Conn.Close may wait to send close_notify
// behind a blocked Write; on a clean end close_notify was already sent by
// CloseWrite.
func (c *tunnelConn) end(s connState) bool {
	c.mu.Lock()
	first := c.state == connOpen
	if first {
		c.state = s
	}
	sockets := c.sockets
	c.sockets = nil
	c.mu.Unlock()
	for _, s := range sockets {
		_ = s.Close()
	}
	return first
}

// closeReason says why the connection ended, for the audit record.
func (c *tunnelConn) closeReason() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch c.state {
	case connFailed:
		return closeError
	case connAborted:
		return closeClosed
	case connRevoked:
		return closeRevoked
	case connDrained:
		return closeDrained
	case connPolicyRevoked:
		return closePolicy
	default:
		return closeEOF
	}
}

// localToTunnel copies agent/target bytes into the tunnel. A clean EOF from
// the local side is carried as TLS close_notify (tls.Conn.CloseWrite), so the
// peer sees a half-close and can still answer.
func (c *tunnelConn) localToTunnel() {
	c.copy(c.tunnel, c.local, &c.out, Outbound, c.tunnel.CloseWrite)
}

// tunnelToLocal copies tunnel bytes to the agent/target. close_notify from
// the peer becomes a TCP half-close (FIN) towards the local side.
func (c *tunnelConn) tunnelToLocal() {
	c.copy(c.local, c.tunnel, &c.in, Inbound, func() error { return closeWrite(c.local) })
}

func (c *tunnelConn) copy(dst io.Writer, src io.Reader, n *atomic.Int64, bytesDir Direction, halfClose func() error) {
	bufp := c.p.buffers.Get().(*[]byte)
	defer c.p.buffers.Put(bufp)
	buf := *bufp
	counter := c.p.metrics.bytes.WithLabelValues(string(bytesDir))
	// A destination that frames what it sends gets room for the header
	// in front of each read (h2frame.go).
	fw, framed := dst.(framedWriter)
	room := 0
	if framed {
		room = frameHeaderLen
	}
	for {
		nr, rerr := src.Read(buf[room:])
		if nr > 0 {
			var nw int
			var werr error
			if framed {
				nw, werr = fw.writeFrame(buf[:room+nr])
			} else {
				nw, werr = dst.Write(buf[:nr])
			}
			n.Add(int64(nw))
			counter.Add(float64(nw))
			if c.mux != nil {
				c.mux.bytes.Add(int64(nw))
			}
			if errors.Is(werr, errStopSending) {
				// The peer stopped reading after it ended its own
				// side; how the connection ends is up to that side's
				// copier.
				return
			}
			if werr != nil {
				c.fail()
				return
			}
		}
		if errors.Is(rerr, io.EOF) {
			if err := halfClose(); err != nil {
				c.fail()
			}
			return
		}
		if rerr != nil {
			c.fail()
			return
		}
	}
}

// closeWrite half-closes s, or closes it when it cannot half-close.
func closeWrite(s net.Conn) error {
	if cw, ok := s.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return s.Close()
}

// serve runs an established connection to the end: it registers it, copies
// both ways (localToTunnel may already run: the client sends payload before
// the status byte arrives), then closes, unregisters and audits it.
func (p *Proxy) serve(ctx context.Context, c *tunnelConn, copierStarted bool) {
	id, drained := p.registry.add(c, time.Now())
	// SetDenyList stores the list before it walks the registry: either it
	// finds this connection, or this check sees the new list. Drain marks
	// the serial under the registry lock as it walks it: either it found
	// this connection, or add saw the mark (a setup that picked our old
	// certificate before the rotation and finished after the drain).
	if p.deniedConn(c.info) {
		c.revoke()
	} else if drained {
		c.drain()
	}
	// SetPolicy likewise stores the policy before it walks the registry.
	p.recheckPolicy(ctx, c)
	active := p.metrics.active.WithLabelValues(string(c.info.Direction))
	active.Inc()
	if !copierStarted {
		c.copiers.Go(c.localToTunnel)
	}
	c.tunnelToLocal()
	c.copiers.Wait()
	c.finish()
	p.registry.remove(id)
	active.Dec()

	rec := audit.Connection{
		Direction:   string(c.info.Direction),
		LocalID:     c.info.LocalID.String(),
		PeerID:      c.info.PeerID.String(),
		DstID:       c.info.DstID.String(),
		PeerSerial:  c.info.PeerSerial,
		LocalSerial: c.info.LocalSerial,
		Target:      c.info.Target,
		Transport:   c.info.Transport,
		BytesIn:     c.in.Load(),
		BytesOut:    c.out.Load(),
		Duration:    time.Since(c.info.Start),
		Reason:      c.closeReason(),
	}
	c.info.stamp(&rec)
	if rec.Reason == closeEOF {
		rec.Reason = "" // audit.Connection: a reason only when not a clean EOF
	}
	p.cfg.Logger.LogAttrs(ctx, slog.LevelDebug, "connection closed",
		slog.String(keyDirection, rec.Direction),
		slog.String(keyLocalID, rec.LocalID),
		slog.String(keyPeerID, rec.PeerID),
		slog.String(keySerial, rec.PeerSerial),
		slog.String(keyLocal, rec.LocalSerial),
		slog.String(keyDstID, rec.DstID),
		slog.String(keyDst, rec.Target),
		slog.Int64(keyBytesIn, rec.BytesIn),
		slog.Int64(keyBytesOut, rec.BytesOut),
		slog.Duration(keyDuration, rec.Duration),
		slog.String(keyReason, c.closeReason()),
	)
	// A stream's record is optional (StreamAudit): its pooled connection's
	// handshake record vouches for it.
	if p.cfg.Audit != nil && (c.mux == nil || p.cfg.StreamAudit) {
		if err := p.cfg.Audit.Append(rec); err != nil {
			// The connection is already gone; the failure also shows in
			// Audit.Err(), which stops new handshakes.
			p.cfg.Logger.LogAttrs(ctx, slog.LevelError, "audit connection record",
				slog.String(keyDirection, rec.Direction), slog.Any(keyErr, err))
		}
	}
}
