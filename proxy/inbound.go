package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// refuseDrainLimit bounds what a refused peer's early payload may cost us
// while we wait for it to read the status byte.
const refuseDrainLimit = 64 << 10

// serveInbound terminates one tunnel from a peer proxy: TLS handshake (chain
// and "allowed somewhere by a Service or the policy" checked in
// VerifyConnection), header, the per-port check, the target dial, then the status byte and the splice. Every
// outcome is recorded exactly once.
func (p *Proxy) serveInbound(ctx context.Context, raw net.Conn) {
	s := &setup{dir: Inbound, start: time.Now(), peerAddr: raw.RemoteAddr().String(), transport: TransportTLS}
	c := &tunnelConn{p: p}
	c.attach(raw)
	stop := context.AfterFunc(ctx, c.abort)
	defer stop()

	if err := p.auditErr(); err != nil {
		// Fail closed: a connection that could not be audited is not served.
		p.metrics.refused.WithLabelValues(string(ReasonAuditUnavailable)).Inc()
		_ = p.record(ctx, s, ReasonAuditUnavailable, err)
		c.abort()
		return
	}
	// One deadline covers the handshake and the header: a peer that
	// trickles bytes cannot hold a slot longer than HandshakeTimeout.
	_ = raw.SetDeadline(s.start.Add(p.cfg.HandshakeTimeout))
	hello, err := awaitHello(raw)
	if err != nil {
		_ = p.record(ctx, s, classify(ctx, err), err)
		c.abort()
		return
	}
	if !p.handshakes.TryAcquire() {
		p.refuseEarly(Inbound, s.peerAddr, s.transport, ReasonMaxHandshakes)
		c.abort()
		return
	}
	releaseHandshake := sync.OnceFunc(p.handshakes.Release)
	defer releaseHandshake()
	// The configuration belongs to the SVID current now. Without one (or
	// with a revoked one) the handshake still runs, so the peer gets an
	// alert, and fails in the certificate callback with s.localErr.
	cfg := p.noSVIDTLS
	l, lerr := p.local()
	if lerr == nil {
		cfg = l.server
	}
	s.localErr = lerr
	tc := tls.Server(hello, cfg)
	c.tunnel = tc
	err = tc.HandshakeContext(withSetup(ctx, s))
	releaseHandshake()
	cs := tc.ConnectionState()
	s.fill(cs, l)
	// The protocol is known once the server has answered the client's
	// hello, before any certificate is checked.
	if t := transportOf(cs.NegotiatedProtocol); t != "" {
		s.transport = t
	}
	if err != nil {
		_ = p.record(ctx, s, classify(ctx, err), err)
		c.abort()
		return
	}
	// VerifyConnection has checked this leaf; it cannot fail here.
	peerID, err := x509svid.IDFromCert(cs.PeerCertificates[0])
	if err != nil {
		_ = p.record(ctx, s, ReasonBadCertificate, err)
		c.abort()
		return
	}
	if s.transport == TransportH2 {
		p.serveH2(ctx, tc, raw, s, peerID)
		c.abort()
		return
	}

	var hb [headerLen]byte
	if _, err := io.ReadFull(tc, hb[:]); err != nil {
		_ = p.record(ctx, s, classify(ctx, err), fmt.Errorf("read tunnel header: %w", err))
		c.abort()
		return
	}
	h, err := parseHeader(hb[:])
	if err != nil {
		p.refuse(ctx, c, s, statusBadRequest, classify(ctx, err), err)
		return
	}
	c.info = ConnInfo{
		Direction: Inbound,
		PeerID:    peerID,
		LocalID:   p.cfg.ID,
		DstID:     p.agentAt(h.Port),
		Port:      h.Port,
		PeerAddr:  s.peerAddr,
		Target:    net.JoinHostPort(p.cfg.TargetHost, strconv.Itoa(int(h.Port))),
		Start:     s.start,
		Transport: TransportTLS,
	}
	v := p.authorize(ctx, c.info)
	if !v.allow {
		p.refuse(ctx, c, s, statusNotAllowed, v.reason, v.err)
		return
	}
	c.authzVersion = v.gen

	target := c.info.Target
	local, err := p.dialer.DialContext(ctx, "tcp", target)
	if err != nil {
		reason := ReasonTargetUnreachable
		if ctx.Err() != nil {
			reason = ReasonShutdown
		}
		p.refuse(ctx, c, s, statusUnreachable, reason, fmt.Errorf("dial target %s: %w", target, err))
		return
	}
	if !c.attach(local) { // shutdown raced the dial
		_ = p.record(ctx, s, ReasonShutdown, ctx.Err())
		return
	}
	c.local = local
	c.info.PeerSerial, c.info.LocalSerial = s.peerSerial, s.localSerial
	c.info.PeerNotBefore, c.info.LocalNotBefore = s.peerNotBefore, s.localNotBefore
	// Audit before the status byte: nothing reaches the target unrecorded.
	if err := p.record(ctx, s, "", nil); err != nil {
		c.abort() // our failure, not the peer's: no status to give
		return
	}
	if _, err := tc.Write([]byte{byte(statusOK)}); err != nil {
		// The copiers will see the broken tunnel at once and end the
		// connection with reason "error".
		c.fail()
	}
	_ = raw.SetDeadline(time.Time{})
	p.serve(ctx, c, false)
}

// refuse records reason, answers st and closes. To make sure the peer reads the status, it sends
// close_notify and drains the peer's early payload until the peer closes or
// the handshake deadline passes: closing a socket with unread data makes the
// kernel send RST, which can destroy the status byte in flight.
func (p *Proxy) refuse(ctx context.Context, c *tunnelConn, s *setup, st status, reason Reason, cause error) {
	_ = p.record(ctx, s, reason, cause)
	defer c.abort()
	if _, err := c.tunnel.Write([]byte{byte(st)}); err != nil {
		return
	}
	if err := c.tunnel.CloseWrite(); err != nil {
		return
	}
	// Ends at the peer's close, a reset, the limit or the deadline; each
	// means the peer had its chance to read the status.
	_, _ = io.Copy(io.Discard, io.LimitReader(c.tunnel, refuseDrainLimit))
}
