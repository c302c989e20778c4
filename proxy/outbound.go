package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"
)

// serveRoute carries one agent connection from a Route's listener to the
// route's peer proxy. The route tracks it, so that SetRoutes can drain it.
func (p *Proxy) serveRoute(ctx context.Context, agent net.Conn, r *route) {
	o, stop := p.newOutbound(ctx, agent, modeRoute)
	defer stop()
	if !r.track(o.c) {
		// Accepted before the route went and handled only after its
		// grace: drained like the others.
		o.c.drain()
	}
	defer r.untrack(o.c)
	if !p.attribute(ctx, o, addrPortOf(agent.LocalAddr())) {
		return
	}
	peerHost, _, _ := net.SplitHostPort(r.Peer) // validated in New
	p.tunnel(ctx, o, Peer{ID: r.PeerID, Tunnel: r.Peer}, r.Transport, r.TargetPort,
		net.JoinHostPort(peerHost, strconv.Itoa(int(r.TargetPort))))
}

// tunnel carries an outbound connection to peer over transport, whichever
// way it arrived (route, transparent or explicit capture), if the policy
// allows its identity to call the destination: the agent registered at port
// on the peer's host, else the peer proxy. A refusal comes before anything
// is dialed. target is what ConnInfo and the connection record name as the
// destination.
func (p *Proxy) tunnel(ctx context.Context, o *outbound, peer Peer, transport string, port uint16, target string) {
	o.c.info = ConnInfo{Direction: Outbound, PeerID: peer.ID, LocalID: o.src.id, DstID: peer.Agents[port], Port: port,
		PeerAddr: peer.Tunnel, Target: target, Start: o.accepted, Transport: transport}
	v := p.authorize(ctx, o.c.info)
	if !v.allow {
		p.conclude(ctx, o, v.reason, v.err)
		return
	}
	o.c.authzVersion = v.gen
	switch transport {
	case TransportH2, TransportQUIC:
		p.tunnelPooled(ctx, o, peer, transport, port)
	default:
		o.c.info.Transport = TransportTLS
		p.tunnelTLS(ctx, o, peer, port)
	}
}

// tunnelTLS carries an outbound connection on a TLS connection of its own:
// dial, TLS handshake (x509svid chain and exactly peer.ID in
// VerifyConnection), header naming port, status, splice.
//
// For routes and transparent capture the agent's first bytes go out right
// behind the header, without waiting for the status (one round trip saved
// for client-first protocols); if the peer refuses, they are discarded with
// the tunnel. An explicit-capture client waits for our answer anyway, and
// must get it: its bytes (the rewritten HTTP request, say) only start once
// the peer said yes, so a refusal can still be answered.
func (p *Proxy) tunnelTLS(ctx context.Context, o *outbound, peer Peer, port uint16) {
	s, c := o.s, o.c
	s.transport = TransportTLS
	s.peerAddr = peer.Tunnel

	if err := p.auditErr(); err != nil {
		p.conclude(ctx, o, ReasonAuditUnavailable, err)
		return
	}
	// Without an SVID (or with a revoked one) the handshake would fail
	// anyway; don't bother the peer. The configuration belongs to the
	// source identity's SVID current now, and so does the session cache it
	// resumes from: an agent never resumes another identity's session.
	l, err := p.localFor(o.src)
	if err != nil {
		p.conclude(ctx, o, classify(ctx, err), err)
		return
	}

	raw, err := p.dialer.DialContext(ctx, "tcp", peer.Tunnel)
	if err != nil {
		reason := ReasonPeerUnreachable
		if ctx.Err() != nil {
			reason = ReasonShutdown
		}
		p.conclude(ctx, o, reason, fmt.Errorf("dial peer %s: %w", peer.Tunnel, err))
		return
	}
	if !c.attach(raw) {
		p.conclude(ctx, o, ReasonShutdown, ctx.Err())
		return
	}
	s.peerAddr = raw.RemoteAddr().String()
	s.start = time.Now() // as inbound: the handshake clock starts on an established TCP connection
	_ = raw.SetDeadline(s.start.Add(p.cfg.HandshakeTimeout))
	cfg := l.client(p, peer.ID, TransportTLS)
	tc := tls.Client(raw, cfg)
	c.tunnel = tc
	// A session that led to a TLS failure (refused on either side, say
	// because a peer's certificate was revoked meanwhile) must not be
	// offered again: the next attempt makes a full handshake. crypto/tls
	// keys the cache by the peer's address when ServerName is empty.
	forget := func() {
		if cfg.ClientSessionCache != nil {
			cfg.ClientSessionCache.Put(raw.RemoteAddr().String(), nil)
		}
	}
	if err := tc.HandshakeContext(withSetup(ctx, s)); err != nil {
		s.fill(tc.ConnectionState(), l)
		forget()
		p.conclude(ctx, o, classify(ctx, err), err)
		return
	}
	s.fill(tc.ConnectionState(), l)
	if _, err := tc.Write(appendHeader(make([]byte, 0, headerLen), port)); err != nil {
		// A peer refusing a resumed session may already have closed.
		forget()
		p.conclude(ctx, o, classify(ctx, err), fmt.Errorf("write tunnel header: %w", err))
		return
	}

	// PeerID: VerifyConnection allowed nothing but peer.ID.
	c.info.PeerSerial, c.info.LocalSerial, c.info.PeerAddr = s.peerSerial, s.localSerial, s.peerAddr
	c.info.PeerNotBefore, c.info.LocalNotBefore = s.peerNotBefore, s.localNotBefore
	early := o.reply == nil
	if early {
		c.copiers.Go(c.localToTunnel)
	}

	var st [1]byte
	if _, err := io.ReadFull(tc, st[:]); err != nil {
		// In TLS 1.3 the client finishes its handshake before the server
		// has checked the client certificate, so a peer refusing us shows
		// up here, as an alert (classified peer_refused).
		forget()
		p.conclude(ctx, o, classify(ctx, err), fmt.Errorf("read tunnel status: %w", err))
		return
	}
	if reason := statusReason(status(st[0])); reason != "" {
		p.conclude(ctx, o, reason, fmt.Errorf("%w: status %#02x", ErrTunnelRefused, st[0]))
		return
	}
	if !p.conclude(ctx, o, "", nil) {
		return
	}
	_ = raw.SetDeadline(time.Time{})
	p.serve(ctx, c, early)
}

// statusReason maps the peer's status byte to a refusal reason ("" for ok).
func statusReason(st status) Reason {
	switch st {
	case statusOK:
		return ""
	case statusNotAllowed:
		return ReasonPeerRefused
	case statusUnreachable:
		return ReasonTargetUnreachable
	default: // statusBadRequest and anything this version does not know
		return ReasonBadRequest
	}
}
