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

// serveOutbound carries one agent connection to the route's peer proxy: dial,
// TLS handshake (x509svid chain and exact PeerID in VerifyConnection), header,
// status, splice. The agent's first bytes go out right behind the header,
// without waiting for the status (one round trip saved for client-first
// protocols); if the peer refuses, they are discarded with the tunnel.
func (p *Proxy) serveOutbound(ctx context.Context, agent net.Conn, r *route) {
	accepted := time.Now()
	s := &setup{dir: Outbound, start: accepted, peerAddr: r.Peer}
	c := &tunnelConn{p: p, local: agent}
	c.attach(agent)
	stop := context.AfterFunc(ctx, c.abort)
	defer stop()

	if err := p.auditErr(); err != nil {
		_ = p.record(ctx, s, ReasonAuditUnavailable, err)
		c.abort()
		return
	}
	// Without an SVID the handshake would fail anyway; don't bother the peer.
	if _, err := p.currentCertificate(); err != nil {
		_ = p.record(ctx, s, ReasonNoSVID, err)
		c.abort()
		return
	}

	d := net.Dialer{Timeout: p.cfg.DialTimeout}
	raw, err := d.DialContext(ctx, "tcp", r.Peer)
	if err != nil {
		reason := ReasonPeerUnreachable
		if ctx.Err() != nil {
			reason = ReasonShutdown
		}
		_ = p.record(ctx, s, reason, fmt.Errorf("dial peer %s: %w", r.Peer, err))
		c.abort()
		return
	}
	if !c.attach(raw) {
		_ = p.record(ctx, s, ReasonShutdown, ctx.Err())
		return
	}
	s.peerAddr = raw.RemoteAddr().String()
	s.start = time.Now() // as inbound: the handshake clock starts on an established TCP connection
	_ = raw.SetDeadline(s.start.Add(p.cfg.HandshakeTimeout))
	tc := tls.Client(raw, r.tls)
	c.tunnel = tc
	if err := tc.HandshakeContext(ctx); err != nil {
		s.fill(tc.ConnectionState())
		_ = p.record(ctx, s, classify(ctx, err), err)
		c.abort()
		return
	}
	cs := tc.ConnectionState()
	s.fill(cs)
	if _, err := tc.Write(appendHeader(make([]byte, 0, headerLen), r.TargetPort)); err != nil {
		_ = p.record(ctx, s, classify(ctx, err), fmt.Errorf("write tunnel header: %w", err))
		c.abort()
		return
	}

	peerHost, _, _ := net.SplitHostPort(r.Peer) // validated in New
	c.info = ConnInfo{
		Direction:  Outbound,
		PeerID:     r.PeerID, // VerifyConnection allowed nothing else
		PeerSerial: s.peerSerial,
		PeerAddr:   s.peerAddr,
		Target:     net.JoinHostPort(peerHost, strconv.Itoa(int(r.TargetPort))),
		Start:      accepted,
	}
	c.copiers.Go(c.localToTunnel)

	var st [1]byte
	if _, err := io.ReadFull(tc, st[:]); err != nil {
		// In TLS 1.3 the client finishes its handshake before the server
		// has checked the client certificate, so a peer refusing us shows
		// up here, as an alert (classified peer_refused).
		_ = p.record(ctx, s, classify(ctx, err), fmt.Errorf("read tunnel status: %w", err))
		c.abort()
		c.copiers.Wait()
		return
	}
	if reason := statusReason(status(st[0])); reason != "" {
		_ = p.record(ctx, s, reason, fmt.Errorf("%w: status %#02x", ErrTunnelRefused, st[0]))
		c.abort()
		c.copiers.Wait()
		return
	}
	if err := p.record(ctx, s, "", nil); err != nil {
		c.abort()
		c.copiers.Wait()
		return
	}
	_ = raw.SetDeadline(time.Time{})
	p.serve(ctx, c, true)
}

// statusReason maps the peer's status byte to a refusal reason ("" for ok).
func statusReason(st status) string {
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
