package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/agentmesh/agentmesh/audit"
)

// errStopSending is returned by a stream's Write when the peer stopped
// reading it after ending its own side: an HTTP/2 server may reset a
// request it has answered in full (RFC 9113 section 8.1). The copier then
// stops without failing the connection; the other direction decides how it
// ends.
var errStopSending = errors.New("peer stopped reading the stream")

// tunnelPooled carries an outbound connection as one stream of a pooled
// connection (transport h2 or quic) to peer: a slot on a pooled connection
// with our current certificate (dialed, with its one handshake record, if
// none has room), the stream naming port, the peer's status, splice. As
// with tls, a route's or transparent capture's first bytes go out before
// the status; an explicit-capture client waits for it.
//
// The stream leaves no handshake record. A refused or failed stream gets a
// connection record with its reason; an established one gets one when it
// closes if Config.StreamAudit is set. Like a handshake, a stream is refused
// while the audit log fails or Config.Revocation reports the deny-list
// stale: a pooled connection must not let new agent connections bypass what
// would have refused a new tls connection.
func (p *Proxy) tunnelPooled(ctx context.Context, o *outbound, peer Peer, transport string, port uint16) {
	s, c := o.s, o.c
	s.transport = transport
	s.peerAddr = peer.Tunnel

	if err := p.auditErr(); err != nil {
		p.concludeStream(ctx, o, ReasonAuditUnavailable, err)
		return
	}
	if err := p.revocationErr(); err != nil {
		p.concludeStream(ctx, o, ReasonRevocationStale, err)
		return
	}
	// The pool is keyed by the source identity and its current
	// certificate: a stream never rides a connection that presented
	// another identity or an older certificate.
	l, err := p.localFor(o.src)
	if err != nil {
		p.concludeStream(ctx, o, classify(ctx, err), err)
		return
	}
	m, st, err := p.pool.open(ctx, l, peer, transport, port)
	if err != nil {
		p.concludeStream(ctx, o, classify(ctx, err), err)
		return
	}
	defer m.release()
	c.mux = m
	c.tunnel = st
	c.info.PeerSerial, c.info.LocalSerial, c.info.PeerAddr = m.peerSerial, m.localSerial, m.peerAddr
	c.info.PeerNotBefore, c.info.LocalNotBefore = m.peerNotBefore, m.localNotBefore
	c.info.ConnID, c.info.PeerNotAfter, c.info.LocalNotAfter = m.id, m.peerNotAfter, m.localNotAfter
	if !c.attach(st) {
		p.concludeStream(ctx, o, ReasonShutdown, ctx.Err())
		return
	}
	early := o.reply == nil
	if early {
		c.copiers.Go(c.localToTunnel)
	}
	stt, err := st.status(p.cfg.HandshakeTimeout)
	if err != nil {
		p.concludeStream(ctx, o, classify(ctx, err), fmt.Errorf("read stream status: %w", err))
		return
	}
	if reason := statusReason(stt); reason != "" {
		p.concludeStream(ctx, o, reason, fmt.Errorf("%w: status %#02x", ErrTunnelRefused, stt))
		return
	}
	if !p.concludeStream(ctx, o, "", nil) {
		return
	}
	p.serve(ctx, c, early)
}

// concludeStream is conclude for a stream: it counts the outcome, records a
// refused or failed stream, answers an explicit-capture client and reports
// whether bytes may flow; if not, it has closed the connection.
func (p *Proxy) concludeStream(ctx context.Context, o *outbound, reason Reason, cause error) bool {
	p.metrics.streams.WithLabelValues(string(Outbound), o.c.info.Transport, resultFor(reason)).Inc()
	p.metrics.captured.WithLabelValues(string(o.mode), capturedResult(reason)).Inc()
	if resultFor(reason) != resultOK {
		p.recordStream(ctx, o.c.info, reason, cause)
	}
	return p.settle(o, reason, cause)
}

// serveStream serves one stream that the peer opened on the inbound pooled
// connection m, asking for port (perr: why its request was malformed): the
// per-port check against m's peer identity, exactly as the tls transport's
// header, the target dial, the status, the splice. The stream's slot on m is
// the caller's.
func (p *Proxy) serveStream(ctx context.Context, m *muxConn, st inStream, port uint16, perr error) {
	info := m.streamInfo()
	if perr == nil {
		info.Port, info.DstID = port, p.agentAt(port)
		info.Target = net.JoinHostPort(p.cfg.TargetHost, strconv.Itoa(int(port)))
	}
	// Whatever the peer does, no new stream rides a connection that a
	// certificate past its NotAfter authenticated: it must dial a new one.
	if reason := m.admit(p.cfg.Now()); reason != "" {
		m.impl.goaway()
		p.refuseStream(ctx, st, info, statusNotAllowed, reason,
			fmt.Errorf("%w: a certificate of the pooled connection expired at %s", ErrCredentialExpired, m.limits.expires))
		return
	}
	if perr != nil {
		p.refuseStream(ctx, st, info, statusBadRequest, classify(ctx, perr), perr)
		return
	}
	// Our failures, not the peer's: no status to give, as with tls.
	for _, f := range []struct {
		reason Reason
		err    error
	}{{ReasonAuditUnavailable, p.auditErr()}, {ReasonRevocationStale, p.revocationErr()}} {
		if f.err != nil {
			p.recordStream(ctx, info, f.reason, f.err)
			p.metrics.streams.WithLabelValues(string(Inbound), m.transport, resultError).Inc()
			_ = st.Close()
			return
		}
	}
	v := p.authorize(ctx, info)
	if !v.allow {
		p.refuseStream(ctx, st, info, statusNotAllowed, v.reason, v.err)
		return
	}
	// A stream counts against MaxConnections like a connection: it holds
	// a socket to the target.
	if !p.limit.TryAcquire() {
		p.metrics.refused.WithLabelValues(string(ReasonMaxConnections)).Inc()
		p.refuseStream(ctx, st, info, statusUnreachable, ReasonMaxConnections, errOverLimit)
		return
	}
	defer p.limit.Release()
	// A connection that presented a certificate of ours that is no longer
	// the current one still serves this stream (its overlap is not over),
	// but the peer should open the next ones on a new connection.
	if l, err := p.local(); err == nil && l.serial != m.localSerial {
		m.impl.goaway()
	}
	local, err := p.dialer.DialContext(ctx, "tcp", info.Target)
	if err != nil {
		reason := ReasonTargetUnreachable
		if ctx.Err() != nil {
			reason = ReasonShutdown
		}
		p.refuseStream(ctx, st, info, statusUnreachable, reason, fmt.Errorf("dial target %s: %w", info.Target, err))
		return
	}
	c := &tunnelConn{p: p, info: info, tunnel: st, local: local, mux: m, authzVersion: v.gen}
	c.attach(st)
	c.attach(local)
	stop := context.AfterFunc(ctx, c.abort)
	defer stop()
	p.metrics.streams.WithLabelValues(string(Inbound), m.transport, resultOK).Inc()
	if err := st.answer(statusOK); err != nil {
		// The copiers see the broken stream at once.
		c.fail()
	}
	p.serve(ctx, c, false)
}

// refuseStream counts, records and answers a refused inbound stream.
func (p *Proxy) refuseStream(ctx context.Context, st inStream, info ConnInfo, s status, reason Reason, cause error) {
	p.metrics.streams.WithLabelValues(string(Inbound), info.Transport, resultFor(reason)).Inc()
	p.metrics.streamRefusals.WithLabelValues(string(Inbound), info.Transport, string(reason)).Inc()
	p.recordStream(ctx, info, reason, cause)
	if err := st.answer(s); err != nil {
		_ = st.Close()
	}
}

// recordStream logs and audits a stream that was refused or failed before
// any byte flowed. Unlike an established stream's record, this one does not
// depend on StreamAudit: a decision against a peer is always on record.
func (p *Proxy) recordStream(ctx context.Context, info ConnInfo, reason Reason, cause error) {
	level, msg := slog.LevelWarn, "stream refused"
	if reason == ReasonShutdown {
		level, msg = slog.LevelDebug, "stream setup interrupted by shutdown"
	}
	if p.cfg.Logger.Enabled(ctx, level) {
		p.cfg.Logger.LogAttrs(ctx, level, msg,
			slog.String(keyDirection, string(info.Direction)),
			slog.String(keyTransport, info.Transport),
			slog.String(keyPeerAddr, info.PeerAddr),
			slog.String(keyPeerID, info.PeerID.String()),
			slog.String(keySerial, info.PeerSerial),
			slog.String(keyLocal, info.LocalSerial),
			slog.String(keyDst, info.Target),
			slog.String(keyReason, string(reason)),
			slog.Any(keyErr, cause))
	}
	if p.cfg.Audit == nil || reason == ReasonAuditUnavailable {
		return
	}
	peerID := ""
	if !info.PeerID.IsZero() {
		peerID = info.PeerID.String()
	}
	rec := audit.Connection{
		Direction:   string(info.Direction),
		LocalID:     info.LocalID.String(),
		PeerID:      peerID,
		DstID:       info.DstID.String(),
		PeerSerial:  info.PeerSerial,
		LocalSerial: info.LocalSerial,
		Target:      info.Target,
		Transport:   info.Transport,
		Duration:    time.Since(info.Start),
		Reason:      string(reason),
	}
	info.stamp(&rec)
	if err := p.cfg.Audit.Append(rec); err != nil {
		p.cfg.Logger.LogAttrs(ctx, slog.LevelError, "audit stream record",
			slog.String(keyDirection, rec.Direction), slog.String(keyReason, string(reason)), slog.Any(keyErr, err))
	}
}
