package proxy

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
)

// setup collects what is known about one tunnel setup (TLS handshake plus
// header exchange) for its single handshake record. Outbound, it also
// covers what comes before a tunnel (capture, the destination decision) and
// what replaces it (passthrough, a refusal before any dial).
type setup struct {
	dir       Direction
	start     time.Time // TCP connection established; HandshakeTimeout runs from here
	peerAddr  string
	transport string      // TransportTLS, TransportH2, TransportQUIC, or outbound transportTCP / transportNone
	mode      captureMode // outbound only: how the agent's connection arrived
	dst       string      // outbound only: the destination, once known

	tlsVersion string
	cipher     string
	resumed    bool
	peerID     string
	peerSerial string
	// peerNotBefore and localNotBefore go with peerSerial and localSerial.
	peerNotBefore, localNotBefore time.Time
	// localID is the identity presented, or to be presented: outbound, the
	// one the agent's connection was attested to. Zero: the host's.
	localID spiffeid.ID
	// localSerial is set by the certificate callback when our SVID was
	// presented, or by fill when the session was resumed (it rests on the
	// certificate of the handshake it resumes, the one local was built
	// for): "" when the handshake never got that far.
	localSerial string
	// localErr is why there is no SVID to present (inbound, handed to the
	// handshake's certificate callback).
	localErr error
	// local is the configuration an inbound quic handshake picked
	// (quicServerConfig), for fill once it is accepted.
	local *localTLS
	// recorded is set by whoever records an inbound quic handshake: its
	// accept or, for a failure, the end of its connection.
	recorded atomic.Bool
	// connID names a pooled connection (h2, quic) in its handshake record
	// and its streams' (newConnID); "" for the tls transport.
	connID string
	// peerNotAfter and localNotAfter are the NotAfter of the peer's leaf
	// and of the one we presented, once known (fill).
	peerNotAfter  time.Time
	localNotAfter time.Time
	// slots are the limits an inbound quic connection holds (quicAdmit).
	slots *quicSlots
}

// claim reports whether the caller is the one to record s (quic).
func (s *setup) claim() bool { return s.recorded.CompareAndSwap(false, true) }

// fill copies what the TLS state knows. It is safe on a failed handshake: it
// takes whatever was negotiated before the failure. local is the
// configuration the handshake ran with, nil for none.
func (s *setup) fill(cs tls.ConnectionState, local *localTLS) {
	if cs.Version != 0 {
		s.tlsVersion = tls.VersionName(cs.Version)
		s.cipher = tls.CipherSuiteName(cs.CipherSuite)
	}
	s.resumed = cs.DidResume
	if cs.DidResume && local != nil {
		s.localSerial, s.localNotBefore = local.serial, local.leaf.NotBefore
	}
	if local != nil && s.localSerial == local.serial {
		s.localNotAfter = local.leaf.NotAfter
	}
	if len(cs.PeerCertificates) > 0 {
		leaf := cs.PeerCertificates[0]
		s.peerSerial, s.peerNotBefore = leaf.SerialNumber.String(), leaf.NotBefore
		s.peerNotAfter = leaf.NotAfter
		if id, err := x509svid.IDFromCert(leaf); err == nil {
			s.peerID = recordedID(id.String())
		}
	}
}

// record audits, counts and logs the outcome of a setup; reason "" (and
// passthrough) is success. A success that cannot be audited becomes a
// failure with reason audit_unavailable and record returns the error: the
// caller must drop the connection, because a handshake that cannot be
// recorded must not carry traffic. Only TLS setups count as handshakes in
// the metrics (every transport's: a pooled connection's handshake is
// recorded once, by its dial or accept); outbound outcomes are counted by
// conclude.
//
// Order: a success is appended before it is counted (the append decides
// whether it is one); a failure is counted and logged before it is appended,
// so whoever sees the record also sees the metric.
func (p *Proxy) record(ctx context.Context, s *setup, reason Reason, cause error) error {
	var r *refusal
	if errors.As(cause, &r) {
		if s.peerID == "" {
			s.peerID = r.peerID
		}
		if s.peerSerial == "" {
			s.peerSerial = r.peerSerial
		}
	}
	d := time.Since(s.start)
	auditing := p.cfg.Audit != nil

	var auditErr error
	if resultFor(reason) == resultOK && auditing {
		if err := p.acknowledge(ctx, s.event(p, reason, d)); err != nil {
			auditErr = fmt.Errorf("%w: %w", ErrAuditUnavailable, err)
			reason, cause = ReasonAuditUnavailable, auditErr
		}
	}

	result := resultFor(reason)
	if knownTransport(s.transport) {
		p.metrics.handshakes.WithLabelValues(string(s.dir), result, s.transport).Inc()
		p.metrics.duration.WithLabelValues(string(s.dir)).Observe(d.Seconds())
	}
	// Anyone can cause a refusal before authentication, as often as the
	// network allows: it is aggregated per source, not recorded and logged
	// one by one (refusals.go).
	if s.dir == Inbound && result != resultOK && preAuth(reason) {
		p.refusals.add(s.dir, s.peerAddr, s.transport, reason,
			audit.RefusedPeer{PeerID: s.peerID, PeerSerial: s.peerSerial, Reason: string(reason)}, time.Now())
		p.logSetup(ctx, s, reason, result, d, cause)
		return auditErr
	}
	p.logSetup(ctx, s, reason, result, d, cause)

	// With the log failed there is nothing to append to; the refusal is
	// still counted and logged.
	if result != resultOK && auditing && reason != ReasonAuditUnavailable {
		if err := p.cfg.Audit.Append(s.event(p, reason, d)); err != nil {
			p.cfg.Logger.LogAttrs(ctx, slog.LevelError, "audit handshake record",
				slog.String(keyDirection, string(s.dir)), slog.String(keyReason, string(reason)), slog.Any(keyErr, err))
		}
	}
	return auditErr
}

// acknowledge appends the record of a setup that is about to carry traffic
// and, unless Config.AuditAck says otherwise, waits until it is durable: a
// connection is served only once its record would survive a crash. Records
// of concurrent handshakes share one fsync (audit.Log's group commit), so
// under load the wait costs a fraction of an fsync per handshake.
func (p *Proxy) acknowledge(ctx context.Context, e audit.Handshake) error {
	if err := p.cfg.Audit.Append(e); err != nil {
		return err
	}
	if p.cfg.AuditAck == AuditAckQueued {
		return nil
	}
	// Bounded by HandshakeTimeout, like the rest of the setup: a volume that
	// hangs refuses the connection instead of holding it. Not cut short by
	// shutdown: the log outlives the proxy.
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.cfg.HandshakeTimeout)
	defer cancel()
	return p.cfg.Audit.Sync(sctx)
}

func (s *setup) event(p *Proxy, reason Reason, d time.Duration) audit.Handshake {
	h := audit.Handshake{
		Direction:   string(s.dir),
		Result:      audit.Result(resultFor(reason)),
		Reason:      string(reason),
		Transport:   s.transport,
		LocalID:     s.presented(p).String(),
		LocalSerial: s.localSerial,
		PeerID:      s.peerID,
		PeerSerial:  s.peerSerial,
		PeerAddr:    s.peerAddr,
		TLSVersion:  s.tlsVersion,
		Cipher:      s.cipher,
		Resumed:     s.resumed,
		Duration:    d,
	}
	h.ConnID, h.PeerNotAfter, h.LocalNotAfter = s.connID, s.peerNotAfter, s.localNotAfter
	return h
}

// presented is the local identity of s: localID, or the host's.
func (s *setup) presented(p *Proxy) spiffeid.ID { return cmp.Or(s.localID, p.cfg.ID) }

// logSetup logs a success at Debug and a refusal at Warn (a shutdown is not
// the peer's fault: Debug).
func (p *Proxy) logSetup(ctx context.Context, s *setup, reason Reason, result string, d time.Duration, cause error) {
	level, msg := slog.LevelWarn, "tunnel refused"
	switch {
	case reason == "":
		level, msg = slog.LevelDebug, "tunnel established"
	case reason == ReasonPassthrough:
		level, msg = slog.LevelDebug, "passthrough established"
	case reason == ReasonShutdown:
		level, msg = slog.LevelDebug, "tunnel setup interrupted by shutdown"
	case s.dir == Inbound && preAuth(reason):
		// Summarised by flushRefusals at a bounded rate.
		level, msg = slog.LevelDebug, "tunnel refused before authentication"
	case s.transport == transportNone:
		msg = "outbound connection refused"
	case s.transport == transportTCP:
		msg = "passthrough failed"
	}
	if !p.cfg.Logger.Enabled(ctx, level) {
		return
	}
	attrs := []slog.Attr{
		slog.String(keyDirection, string(s.dir)),
		slog.String(keyPeerAddr, s.peerAddr),
		slog.String(keyPeerID, s.peerID),
		slog.String(keySerial, s.peerSerial),
		slog.String(keyLocalID, s.presented(p).String()),
		slog.String(keyLocal, s.localSerial),
		slog.Bool(keyResumed, s.resumed),
		slog.Duration(keyDuration, d),
	}
	if s.mode != "" {
		attrs = append(attrs, slog.String(keyMode, string(s.mode)), slog.String(keyDst, s.dst),
			slog.String(keyTransport, s.transport))
	}
	if result != resultOK {
		attrs = append(attrs, slog.String(keyResult, result), slog.String(keyReason, string(reason)), slog.Any(keyErr, cause))
	}
	p.cfg.Logger.LogAttrs(ctx, level, msg, attrs...)
}
