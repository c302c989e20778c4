package proxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/agentmesh/agentmesh/audit"
)

// A pooled connection carries new streams only while both certificates that
// authenticated it (the leaf we presented and the peer's) are valid and it is
// younger than PoolMaxLifetime; revocation closes it outright (SetDenyList).
// Each connection's limits are computed once, at its handshake (muxLimits),
// and checked on every stream open in both directions: the dialing side
// stops opening streams on it (reserve), the receiving side refuses a stream
// that arrives on it after a certificate expired (admit), whatever the
// dialing side does. A timer moves it to draining when it becomes unusable,
// so an idle connection does not wait for a stream to notice.

// muxExpiryMargin is how long before the earlier NotAfter both sides stop
// opening new streams on a pooled connection: a stream the dialing side
// opens just before must reach the receiving side, which refuses any stream
// after NotAfter, also across that much clock skew. It never takes more than
// half of the validity left at the handshake, so a connection to a peer whose
// certificate is about to be renewed still carries streams until then.
const muxExpiryMargin = 2 * time.Second

// muxIdleGrace is added to PoolIdleTimeout on the receiving side: with equal
// settings the dialing side, which knows when it is about to open a stream,
// closes an idle connection first, so the receiving side never closes one
// under a stream in flight.
const muxIdleGrace = 5 * time.Second

// Why a pooled connection stopped taking new streams or closed (the reason
// label of agentmesh_proxy_pool_ended_total).
const (
	poolEndCredential  = string(ReasonCredentialExpired) // a certificate that authenticated it reached (nearly) its NotAfter
	poolEndMaxLifetime = "max_lifetime"                  // older than PoolMaxLifetime
	poolEndMaxBytes    = "max_bytes"                     // carried PoolMaxBytes
	poolEndIdle        = "idle_timeout"                  // no stream for PoolIdleTimeout: closed
)

// muxLimits are the time limits of one pooled connection, fixed at its
// handshake.
type muxLimits struct {
	// expires is the earlier NotAfter of the two leaves: from then on the
	// receiving side refuses new streams. Zero when unknown (no leaf).
	expires time.Time
	// usableUntil is when both sides stop opening new streams and the
	// connection drains: the earliest of created+maxLifetime and expires
	// less the margin.
	usableUntil time.Time
	// endReason says which of the two bounds usableUntil.
	endReason string
}

// newMuxLimits computes the limits of a connection created at created (on
// the certificate clock, Config.Now) with the given leaves' NotAfter (zero:
// unknown, no bound).
func newMuxLimits(created time.Time, maxLifetime time.Duration, localNotAfter, peerNotAfter time.Time) muxLimits {
	l := muxLimits{usableUntil: created.Add(maxLifetime), endReason: poolEndMaxLifetime}
	for _, na := range []time.Time{localNotAfter, peerNotAfter} {
		if !na.IsZero() && (l.expires.IsZero() || na.Before(l.expires)) {
			l.expires = na
		}
	}
	if l.expires.IsZero() {
		return l
	}
	margin := min(muxExpiryMargin, max(l.expires.Sub(created)/2, 0))
	if stop := l.expires.Add(-margin); stop.Before(l.usableUntil) {
		l.usableUntil, l.endReason = stop, poolEndCredential
	}
	return l
}

// usableAt reports whether new streams may be opened at now.
func (l muxLimits) usableAt(now time.Time) bool { return now.Before(l.usableUntil) }

// expiredAt reports whether a certificate that authenticated the connection
// has expired at now.
func (l muxLimits) expiredAt(now time.Time) bool {
	return !l.expires.IsZero() && !now.Before(l.expires)
}

// newConnID names a pooled connection in audit records (handshake and
// streams), so that its streams can be told apart from another
// connection's between the same two credentials.
func newConnID() string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	return hex.EncodeToString(b[:])
}

// stamp adds to rec when info started and, for a stream, its pooled
// connection and that connection's certificates' NotAfter.
func (info ConnInfo) stamp(rec *audit.Connection) {
	rec.Started, rec.ConnID = info.Start, info.ConnID
	rec.PeerNotAfter, rec.LocalNotAfter = info.PeerNotAfter, info.LocalNotAfter
}

// h2OverMaxStreams ends x/net's name (http2.Server.CountError, as
// "stream_PROTOCOL_ERROR_over_max_streams") for a stream refused because the
// client already had PoolMaxStreams open: x/net resets it itself
// (RST_STREAM), before any handler runs.
const h2OverMaxStreams = "_over_max_streams"

// refusedOverMax counts and audits a stream that the transport refused on m
// because the peer exceeded PoolMaxStreams. (quic-go gives a peer no credit
// for more, and closes a connection that exceeds it anyway.)
func (p *Proxy) refusedOverMax(ctx context.Context, m *muxConn) {
	info := m.streamInfo()
	p.metrics.streams.WithLabelValues(string(Inbound), m.transport, resultRefused).Inc()
	p.metrics.streamRefusals.WithLabelValues(string(Inbound), m.transport, string(ReasonMaxStreams)).Inc()
	p.recordStream(ctx, info, ReasonMaxStreams,
		fmt.Errorf("%w: more than %d streams at once", ErrMaxStreams, p.cfg.PoolMaxStreams))
}

// streamInfo describes a stream the peer opens on the inbound connection m
// now, before its target is known.
func (m *muxConn) streamInfo() ConnInfo {
	return ConnInfo{Direction: Inbound, PeerID: m.peerID, LocalID: m.localID, PeerSerial: m.peerSerial,
		LocalSerial: m.localSerial, PeerAddr: m.peerAddr, Start: time.Now(), Transport: m.transport,
		ConnID: m.id, PeerNotAfter: m.peerNotAfter, LocalNotAfter: m.localNotAfter,
		PeerNotBefore: m.peerNotBefore, LocalNotBefore: m.localNotBefore}
}

// startExpiry arms the timer that moves m to draining when its limits end.
func (m *muxConn) startExpiry() {
	d := m.limits.usableUntil.Sub(m.p.cfg.Now())
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.state == muxClosed {
		return
	}
	m.expiry = time.AfterFunc(max(d, 0), m.expire)
}

// expire moves m to draining: outbound it takes no new streams and closes
// after its last one; inbound the peer is asked to open no new streams here
// (those it opens before it hears are served unless a certificate expired,
// see admit).
func (m *muxConn) expire() {
	if m.dir == Outbound {
		m.retireFor(m.limits.endReason)
		return
	}
	m.p.metrics.poolEnded.WithLabelValues(string(m.dir), m.transport, m.limits.endReason).Inc()
	m.impl.goaway()
}

// admit decides a stream the peer opened on an inbound connection, at now:
// "" to serve it, or ReasonCredentialExpired.
func (m *muxConn) admit(now time.Time) Reason {
	if m.limits.expiredAt(now) {
		return ReasonCredentialExpired
	}
	return ""
}

// closeIfIdle closes m (gracefully) when it is open with no stream since
// before cutoff, and reports whether it did. Checked and closed under one
// lock, so that no stream is reserved on a connection being closed.
func (m *muxConn) closeIfIdle(cutoff time.Time) bool {
	m.mu.Lock()
	if m.state == muxClosed || m.active > 0 || !m.idleSince.Before(cutoff) {
		m.mu.Unlock()
		return false
	}
	m.state = muxClosed
	m.stopTimers()
	m.mu.Unlock()
	// Idle this long, everything it sent is acknowledged: no linger.
	m.impl.close(true)
	return true
}
