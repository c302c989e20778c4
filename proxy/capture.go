package proxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"
)

// captureMode says how an outbound connection reached the proxy: the mode
// label of agentmesh_proxy_captured_total and the mode key in logs.
type captureMode string

const (
	modeRoute       captureMode = "route"       // a Route's listener
	modeTransparent captureMode = "transparent" // REDIRECTed to Config.Outbound
	modeExplicit    captureMode = "explicit"    // SOCKS5 or HTTP on Config.Explicit
)

// outbound is an agent connection on its way out, from accept until its
// setup is concluded. Routes, transparent and explicit capture all build one
// and all end in conclude, once.
type outbound struct {
	mode     captureMode
	accepted time.Time
	agent    net.Conn // the accepted socket itself
	src      identity // the identity its tunnel presents: the host's until attested
	c        *tunnelConn
	s        *setup
	// reply answers an explicit-capture client once its request is known:
	// success when resultFor(reason) is ok, else the refusal (cause may be
	// a *requestError carrying the exact bytes). Nil for routes and
	// transparent capture, whose clients only see bytes flow or the
	// connection close.
	reply func(reason Reason, cause error) error
}

// newOutbound starts tracking an accepted agent connection: shutdown closes
// it from now on. The returned stop must be called when the handler ends.
func (p *Proxy) newOutbound(ctx context.Context, agent net.Conn, mode captureMode) (*outbound, func()) {
	now := time.Now()
	c := &tunnelConn{p: p, local: agent}
	c.attach(agent)
	stop := context.AfterFunc(ctx, c.abort)
	o := &outbound{
		mode:     mode,
		accepted: now,
		agent:    agent,
		src:      p.host(),
		c:        c,
		// Until a destination is known, the only other end is the client.
		s: &setup{dir: Outbound, start: now, peerAddr: agent.RemoteAddr().String(), transport: transportNone, mode: mode},
	}
	return o, func() { stop() }
}

// attribute attests o (see attest) and makes the identity found the one
// its tunnel presents. remote is where the agent's socket points. If o is
// refused (UnattestedDeny) it concludes it and reports false.
func (p *Proxy) attribute(ctx context.Context, o *outbound, remote netip.AddrPort) bool {
	who, err := p.attest(o.agent, remote)
	if err != nil {
		p.conclude(ctx, o, ReasonUnattested, err)
		return false
	}
	o.src = who
	o.s.localID = who.id
	return true
}

// conclude records the outcome of an outbound setup (reason "" or
// passthrough is success), counts it by mode and answers an explicit-capture
// client. It reports whether bytes may flow; if not, it has closed the
// connection.
func (p *Proxy) conclude(ctx context.Context, o *outbound, reason Reason, cause error) bool {
	if err := p.record(ctx, o.s, reason, cause); err != nil {
		reason, cause = ReasonAuditUnavailable, err
	}
	p.metrics.captured.WithLabelValues(string(o.mode), capturedResult(reason)).Inc()
	return p.settle(o, reason, cause)
}

// settle answers an explicit-capture client with the outcome of an outbound
// setup, and closes the connection unless reason is a success. It reports
// whether bytes may flow.
func (p *Proxy) settle(o *outbound, reason Reason, cause error) bool {
	ok := resultFor(reason) == resultOK
	if o.reply != nil {
		// On success a failed reply needs no handling here: the client is
		// gone, the splice sees it at once and the connection record says
		// so. On failure there is nothing left to tell.
		_ = o.reply(reason, cause)
		if ok {
			return true
		}
		o.linger()
	}
	if !ok {
		o.c.abort()
		o.c.copiers.Wait()
	}
	return ok
}

// linger makes sure a refused explicit-capture client reads its error reply:
// closing a socket with unread input (the body of a refused POST, say) makes
// the kernel send RST, which can destroy the reply in flight. So it
// half-closes and drains the client, bounded in bytes and by the deadline
// set at accept. No copier reads the client before success, so this is the
// only reader.
func (o *outbound) linger() {
	if err := closeWrite(o.agent); err != nil {
		return
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(o.agent, refuseDrainLimit))
}

// capture carries a captured connection to dst: refused when dst is this
// proxy (a loop), tunnelled to the proxy the Directory names, else handed to
// the Unknown policy. Transparent and explicit capture both end here.
func (p *Proxy) capture(ctx context.Context, o *outbound, dst netip.AddrPort) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	o.s.dst = dst.String()
	o.s.peerAddr = o.s.dst
	if p.isSelf(dst) {
		p.conclude(ctx, o, ReasonLoop, fmt.Errorf("%w: %s is a listener of this proxy", ErrLoop, dst))
		return
	}
	if peer, ok := p.lookup(dst.Addr()); ok {
		// A captured connection to the very tunnel it would be carried to
		// is this proxy's own dial coming back: the iptables exclusion
		// (Mark or uid) is missing. Carrying it would open another tunnel,
		// captured again, without end.
		if t, err := netip.ParseAddrPort(peer.Tunnel); err == nil &&
			t.Addr().Unmap() == dst.Addr().WithZone("") && t.Port() == dst.Port() {
			p.conclude(ctx, o, ReasonLoop, fmt.Errorf("%w: %s is the tunnel of %s (is the proxy's own traffic excluded from capture?)", ErrLoop, dst, peer.ID))
			return
		}
		p.tunnel(ctx, o, peer, chooseTransport(p.cfg.Transports, peer.Transports), dst.Port(), dst.String())
		return
	}
	if p.cfg.Unknown == UnknownPassthrough {
		p.passthrough(ctx, o, dst)
		return
	}
	p.conclude(ctx, o, ReasonUnknownDestination, fmt.Errorf("%w: %s", ErrUnknownDestination, dst))
}

// passthrough dials dst directly in plain TCP and splices the agent to it,
// if the outbound policy allows its identity to reach dst outside the mesh
// (decided before anything is dialed, like a tunnel). The record (result
// ok, reason passthrough, transport tcp) is written before any byte flows,
// like a tunnel's.
func (p *Proxy) passthrough(ctx context.Context, o *outbound, dst netip.AddrPort) {
	o.s.transport = transportTCP
	o.c.info = ConnInfo{
		Direction: Outbound,
		LocalID:   o.src.id,
		PeerAddr:  dst.String(),
		Port:      dst.Port(),
		Target:    dst.String(),
		Start:     o.accepted,
		Transport: transportTCP,
	}
	v := p.authorize(ctx, o.c.info)
	if !v.allow {
		p.conclude(ctx, o, v.reason, v.err)
		return
	}
	o.c.authzVersion = v.gen
	if err := p.auditErr(); err != nil {
		p.conclude(ctx, o, ReasonAuditUnavailable, err)
		return
	}
	conn, err := p.dialer.DialContext(ctx, "tcp", dst.String())
	if err != nil {
		reason := ReasonTargetUnreachable
		if ctx.Err() != nil {
			reason = ReasonShutdown
		}
		p.conclude(ctx, o, reason, fmt.Errorf("dial passthrough %s: %w", dst, err))
		return
	}
	if !o.c.attach(conn) {
		p.conclude(ctx, o, ReasonShutdown, ctx.Err())
		return
	}
	o.c.tunnel = conn.(*net.TCPConn) // what a "tcp" Dialer returns
	if !p.conclude(ctx, o, ReasonPassthrough, nil) {
		return
	}
	p.serve(ctx, o.c, false)
}

// isSelf reports whether dst is one of this proxy's own listeners (tunnel,
// outbound, explicit): carrying a connection there would come back to us.
// Only a destination on one of our ports costs more than a comparison.
func (p *Proxy) isSelf(dst netip.AddrPort) bool {
	for _, l := range p.self {
		if l.Port() != dst.Port() {
			continue
		}
		if l.Addr().IsUnspecified() {
			if isLocalAddr(dst.Addr()) {
				return true
			}
			continue
		}
		if l.Addr().Unmap() == dst.Addr().WithZone("") {
			return true
		}
	}
	return false
}

// isLocalAddr reports whether a is an address of this host, where a
// wildcard listener would receive it. It lists the interfaces, so it only
// runs for destinations on one of the proxy's ports; when they cannot be
// listed it says yes, refusing rather than risking a loop.
func isLocalAddr(a netip.Addr) bool {
	a = a.Unmap().WithZone("")
	if a.IsLoopback() || a.IsUnspecified() {
		return true
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return true
	}
	for _, ia := range addrs {
		if n, ok := ia.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap() == a {
				return true
			}
		}
	}
	return false
}

// addrPortOf converts a TCP address; anything else is the zero AddrPort.
func addrPortOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	return netip.AddrPort{}
}

// prefixConn is an agent connection whose first bytes were already read
// from the socket by a capture parser, or produced by it (a rewritten HTTP
// request): Read returns them before reading the socket. Only the
// localToTunnel copier reads it.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (c *prefixConn) Read(b []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(b, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

// CloseWrite half-closes the socket, so the splice can pass on a peer's
// close_notify.
func (c *prefixConn) CloseWrite() error { return closeWrite(c.Conn) }
