package proxy

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/internal/metricreg"
)

// metrics are the proxy's Prometheus collectors. They always exist so the hot
// path never checks for nil; registering them is optional.
type metrics struct {
	handshakes  *prometheus.CounterVec   // direction, result, transport
	duration    *prometheus.HistogramVec // direction
	active      *prometheus.GaugeVec     // direction
	bytes       *prometheus.CounterVec   // direction
	captured    *prometheus.CounterVec   // mode, result
	revoked     *prometheus.CounterVec   // direction
	rotations   *prometheus.CounterVec   // trigger
	drained     *prometheus.CounterVec   // direction
	pool        *prometheus.GaugeVec     // direction, transport
	streams     *prometheus.CounterVec   // direction, transport, result
	keyUpdates  *prometheus.CounterVec   // initiator
	attested    *prometheus.CounterVec   // result
	authzDenied *prometheus.CounterVec   // direction, rule
	poolEnded   *prometheus.CounterVec   // direction, transport, reason
	// streamRefusals are inbound streams refused, by reason.
	streamRefusals *prometheus.CounterVec // direction, transport, reason
	refused        *prometheus.CounterVec // reason

	// The children of attested, resolved once: every captured connection
	// counts one.
	attestAgent, attestHost, attestRefused prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		handshakes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricHandshakes,
			Help: "Tunnel handshakes by direction, result (ok, refused, error) and transport (tls: one per connection; h2, quic: one per pooled connection).",
		}, []string{labelDirection, labelResult, labelTransport}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: metricHandshakeDuration,
			Help: "Time from the start of the TLS handshake until the tunnel was established or refused.",
			// 1 ms .. ~8 s: loopback handshakes take about a millisecond,
			// HandshakeTimeout defaults to 10 s.
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}, []string{labelDirection}),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: metricActiveConnections,
			Help: "Proxied connections currently open, by direction.",
		}, []string{labelDirection}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricBytes,
			Help: "Payload bytes of proxied connections: direction=inbound counts bytes received from peer proxies (or passthrough destinations), outbound bytes sent to them.",
		}, []string{labelDirection}),
		captured: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricCaptured,
			Help: "Outbound agent connections by how they reached the proxy (mode: route, transparent, explicit) and what became of them (result: ok = tunnelled, passthrough, denied = no proxy at the destination, refused, error).",
		}, []string{labelMode, labelResult}),
		revoked: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricRevoked,
			Help: "Established proxied connections closed because the deny-list denied the peer's certificate or the one this proxy presented, by direction.",
		}, []string{labelDirection}),
		rotations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricTicketRotations,
			Help: "Session-ticket key changes, by trigger (period: the newest key reached its period; deny_list: a new deny-list replaced every key; compromise, policy, ca_removed, ...: ResetTicketKeys with that cause).",
		}, []string{labelTrigger}),
		drained: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricDrained,
			Help: "Established proxied connections closed because the credential this proxy presented on them was drained (its overlap and grace ended), by direction.",
		}, []string{labelDirection}),
		pool: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: metricPoolConnections,
			Help: "Pooled tunnel connections (transports h2 and quic) currently open, by direction (outbound: dialed by this proxy) and transport.",
		}, []string{labelDirection, labelTransport}),
		streams: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricStreams,
			Help: "Streams of pooled tunnel connections (one per agent connection), by direction, transport and result (ok, refused, error).",
		}, []string{labelDirection, labelTransport, labelResult}),
		keyUpdates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricQUICKeyUpdates,
			Help: "QUIC traffic-key updates (RFC 9001 section 6) on this proxy's quic connections, by initiator (local, peer).",
		}, []string{labelInitiator}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricRefused,
			Help: "Connections refused before any handshake work, by reason: max_connections (Config.MaxConnections were open), max_handshakes (Config.MaxHandshakes inbound handshakes were in flight), audit_unavailable (the audit log could not be written: the proxy fails closed).",
		}, []string{labelReason}),
		attested: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricAttestations,
			Help: "Captured connections attributed to a local identity (with Config.Agents), by result: agent (the connecting uid is a registered agent's), host (it is not, or could not be found: the host identity), refused (it is not, and unattested connections are denied).",
		}, []string{labelResult}),
		authzDenied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricAuthzDenied,
			Help: "Connections the authorization policy (Services, Config.Policy, SetPolicy) refused at setup, by direction and deciding rule (default: no rule allowed).",
		}, []string{labelDirection, labelRule}),
		poolEnded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricPoolEnded,
			Help: "Pooled tunnel connections that stopped taking new streams (and drained) or closed because of a pool limit, by direction, transport and reason: credential_expired (a certificate that authenticated it is at its NotAfter), max_lifetime, max_bytes, idle_timeout (closed).",
		}, []string{labelDirection, labelTransport, labelReason}),
		streamRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricStreamRefusals,
			Help: "Streams of pooled tunnel connections this proxy refused, by direction, transport and reason (credential_expired: the connection's peer certificate or ours has expired; max_streams: the peer opened more than pool.max_streams at once; the other handshake reasons).",
		}, []string{labelDirection, labelTransport, labelReason}),
	}
	m.attestAgent = m.attested.WithLabelValues(attestedAgent)
	m.attestHost = m.attested.WithLabelValues(attestedHost)
	m.attestRefused = m.attested.WithLabelValues(attestedRefused)
	// Create every child up front so dashboards see zeros, not gaps.
	for _, d := range []Direction{Inbound, Outbound} {
		for _, r := range []string{resultOK, resultRefused, resultError} {
			for _, t := range []string{TransportTLS, TransportH2, TransportQUIC} {
				m.handshakes.WithLabelValues(string(d), r, t)
			}
		}
		for _, t := range []string{TransportH2, TransportQUIC} {
			m.pool.WithLabelValues(string(d), t)
			for _, r := range []string{resultOK, resultRefused, resultError} {
				m.streams.WithLabelValues(string(d), t, r)
			}
			for _, r := range []string{poolEndCredential, poolEndMaxLifetime, poolEndMaxBytes, poolEndIdle} {
				m.poolEnded.WithLabelValues(string(d), t, r)
			}
			m.streamRefusals.WithLabelValues(string(d), t, string(ReasonCredentialExpired))
			m.streamRefusals.WithLabelValues(string(d), t, string(ReasonMaxStreams))
		}
		m.duration.WithLabelValues(string(d))
		m.active.WithLabelValues(string(d))
		m.bytes.WithLabelValues(string(d))
		m.revoked.WithLabelValues(string(d))
		m.drained.WithLabelValues(string(d))
		m.authzDenied.WithLabelValues(string(d), defaultRule)
	}
	for _, i := range []string{initiatorLocal, initiatorPeer} {
		m.keyUpdates.WithLabelValues(i)
	}
	for _, t := range []string{triggerPeriod, triggerDenyList, causeCompromise, causePolicy, causeCARemoved} {
		m.rotations.WithLabelValues(t)
	}
	for _, mode := range []captureMode{modeRoute, modeTransparent, modeExplicit} {
		for _, r := range []string{resultOK, resultPassthrough, resultDenied, resultRefused, resultError} {
			m.captured.WithLabelValues(string(mode), r)
		}
	}
	for _, r := range []Reason{ReasonMaxConnections, ReasonMaxHandshakes, ReasonAuditUnavailable} {
		m.refused.WithLabelValues(string(r))
	}
	// All or none, so that a New that failed leaves the Registerer as it was.
	if err := metricreg.Register(reg, m.handshakes, m.duration, m.active, m.bytes, m.captured, m.revoked, m.rotations, m.drained,
		m.pool, m.streams, m.keyUpdates, m.attested, m.authzDenied, m.poolEnded, m.streamRefusals, m.refused); err != nil {
		return nil, err
	}
	return m, nil
}
