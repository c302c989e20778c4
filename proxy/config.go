package proxy

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"math"
	"net"
	"slices"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/svidrules"
	"github.com/agentmesh/agentmesh/policy"
)

// Credentials is what the proxy needs from the rotator. The proxy calls
// TLSCertificate on every handshake and never caches the result, so a
// rotation takes effect on the next handshake while established connections
// keep the credential they authenticated with. Both methods are called
// concurrently from many handshakes and must not block on I/O.
type Credentials interface {
	// TLSCertificate returns the current SVID with Leaf set. An error means
	// there is no valid SVID: the handshake is refused.
	TLSCertificate() (*tls.Certificate, error)
	// GetX509BundleForTrustDomain returns the trust bundle peers of td are
	// verified against; an error means td is not trusted.
	x509bundle.Source
}

// Route is an explicit outbound listener: agents connect to Listen and are
// tunnelled to TargetPort on the host of the peer proxy at Peer. Transparent
// and explicit capture end in the same tunnel code, with the (peer, identity,
// port) triple taken from the Directory instead.
type Route struct {
	// Listen is the local address agents connect to, e.g. "127.0.0.1:18080".
	// Required; without a host (":18080") it binds 127.0.0.1: anyone who
	// can connect travels with this host's identity, so reaching it from
	// the network takes an explicit address such as "0.0.0.0:18080". Port 0
	// picks a free port (see Proxy.RouteAddr).
	Listen string
	// Peer is the peer proxy's tunnel address, host:port. Required.
	Peer string
	// PeerID is the SPIFFE ID the peer proxy must present. Any other SVID,
	// however valid, is refused: that is what stops impersonation by
	// another member of the trust domain. Required.
	PeerID spiffeid.ID
	// TargetPort is the port on the peer's host to deliver to. Required.
	TargetPort uint16
	// Transport is how agent connections reach Peer: TransportTLS (one TLS
	// connection each), TransportH2 or TransportQUIC (one stream each of a
	// pooled connection). Any but tls must be in Config.Transports, and
	// the peer must accept it. Default "": tls.
	Transport string
}

// Service is an inbound meshed port on this host.
type Service struct {
	// Port is delivered to Config.TargetHost:Port. Required, unique.
	Port uint16
	// Allow lists the peers allowed to reach Port (exact SPIFFE IDs).
	// Required: an empty list would be a port nobody can reach.
	Allow []spiffeid.ID
}

// Config configures a Proxy. The zero value of every optional field is a
// usable default.
type Config struct {
	// ID is this proxy's SPIFFE ID: the host identity, presented on every
	// inbound tunnel and on outbound ones not attributed to an agent, and
	// written to audit records as local_id unless an agent's identity was
	// presented. Required.
	ID spiffeid.ID
	// Credentials supplies the SVID and the trust bundles. Required.
	Credentials Credentials
	// MaxIntermediates is how many intermediate certificates a peer's chain
	// may carry (anchors of its trust domain sent along not counted); a
	// longer chain is refused before its signatures are checked (reason
	// chain_too_long). The mesh's CA issues from one intermediate; allow
	// more only for chains through cross-signed roots. Default 0: 1; range
	// 0..4 (svidrules.MaxIntermediatesLimit).
	MaxIntermediates int
	// TunnelListen is the address inbound tunnels are accepted on.
	// Default ":15008"; port 0 picks a free port (see Proxy.TunnelAddr).
	TunnelListen string
	// Routes are the explicit outbound listeners. Optional.
	Routes []Route
	// Outbound is the transparent-capture listener, where iptables REDIRECTs
	// agent traffic (conventionally ":15001"). The proxy reads each
	// connection's original destination with SO_ORIGINAL_DST and carries it
	// as Directory and Unknown say (docs/capture.md). On a loopback address
	// (127.0.0.1:15001 or [::1]:15001) the proxy also listens on the other
	// family's loopback at the same port, where ip6tables (or iptables)
	// REDIRECTs, when the host has it. Only clients at one of this host's
	// addresses are carried (reason not_local otherwise). Linux only.
	// Default "": off. Port 0 picks a free port (see Proxy.OutboundAddr).
	Outbound string
	// Explicit is the explicit-capture listener for agents that are
	// configured with a proxy rather than redirected (conventionally
	// "127.0.0.1:15080"): it speaks SOCKS5 (CONNECT) and HTTP/1.1 (CONNECT
	// and absolute-URI requests), so HTTPS_PROXY, http_proxy and ALL_PROXY
	// work. Anyone who can connect to it can use the host's identity, so
	// without a host (":15080") it binds 127.0.0.1, and whatever it binds,
	// only clients at one of this host's addresses are served (reason
	// not_local otherwise, before their request is read): it is never a
	// relay for the network. Default "": off. Port 0 picks a free port (see
	// Proxy.ExplicitAddr).
	Explicit string
	// Strict is the strict-mode listener (conventionally ":15006"): plain TCP
	// that iptables REDIRECTed from other hosts to a meshed agent port lands
	// here and is refused and audited (reason plaintext_refused), so nothing
	// unauthenticated reaches an agent. Default "" = off.
	Strict string
	// Directory says which proxy lives at a captured destination. Routes do
	// not use it. Default nil: no proxy is known anywhere, so every captured
	// connection goes to the Unknown policy.
	Directory Directory
	// Unknown is what happens to a captured connection whose destination
	// the Directory does not know. Default UnknownDeny.
	Unknown UnknownPolicy
	// Mark, when not 0, is set as SO_MARK on every socket the proxy dials
	// (peer tunnels, passthrough destinations, local targets), so that an
	// iptables rule such as "-m mark --mark <Mark> -j RETURN" keeps the
	// proxy's own traffic out of capture without relying on its uid. Needs
	// CAP_NET_ADMIN, checked by New. Linux only. Default 0: no mark; range
	// 0..4294967295.
	Mark int
	// Services are the inbound meshed ports. With none (and no Policy),
	// every inbound tunnel is refused (and audited).
	Services []Service
	// Agents are the local agents this proxy holds identities for. Nil:
	// every captured connection uses the host identity. Otherwise each
	// captured connection (Route, Outbound, Explicit) is attributed to the
	// agent registered for the uid that owns the agent's socket and
	// presents that agent's SVID on its tunnel; inbound tunnels always
	// present the host's.
	Agents Agents
	// Unattested decides captured connections whose process's uid is not a
	// registered agent's, or cannot be found: UnattestedDeny (default)
	// refuses them (reason "unattested", audited and counted),
	// UnattestedHost presents the host identity. Ignored when Agents is
	// nil.
	Unattested UnattestedPolicy
	// Policy is the authorization policy in force at start (see
	// SetPolicy). Inbound, a port is reachable by a peer that a Service for
	// that port lists or that the policy allows; outbound, when the policy
	// has outbound rules, a connection is tunnelled only if they allow its
	// source identity (host or agent) to call its destination (the remote
	// agent registered at the target port, else the peer proxy). Nil:
	// Services alone authorize inbound tunnels, outbound calls are
	// unrestricted.
	Policy *policy.Authz
	// TargetHost is where inbound tunnels are delivered. Default "127.0.0.1".
	TargetHost string
	// Audit receives one record per handshake (success and failure) and per
	// closed connection. Nil disables auditing. While Audit.Err() is not nil
	// new handshakes are refused, so no handshake goes unrecorded.
	Audit AuditLog
	// Registerer registers the proxy's metrics. Nil: metrics are kept but
	// not registered.
	Registerer prometheus.Registerer
	// Logger receives Debug per connection and Warn per refused handshake.
	// Nil discards.
	Logger *slog.Logger
	// HandshakeTimeout bounds the TLS handshake plus the tunnel header
	// exchange, and the time an explicit-capture client has to send its
	// complete request; slow or silent peers are cut. Default 10s; must be
	// >= 0.
	HandshakeTimeout time.Duration
	// DialTimeout bounds dialing a peer proxy, a passthrough destination or
	// a local target, and resolving a host name an explicit-capture client
	// asked for. Default 5s; must be >= 0.
	DialTimeout time.Duration
	// MaxConnections caps concurrent connections: inbound tunnels (tls, h2
	// and quic together), capture and route listeners, handshaking and
	// silent ones included. Over the cap a new connection is closed at
	// once, counted in agentmesh_proxy_connections_refused_total{reason=
	// "max_connections"} and aggregated like other refusals before
	// authentication (RefusalInterval). Default 0: DefaultMaxConnections
	// (4096); must be >= 0.
	MaxConnections int
	// MaxHandshakes caps inbound handshakes in flight (tls and quic), from
	// the peer's first byte (tls) or first packet (quic) until the handshake
	// ends; a connection that sends nothing holds no handshake slot. Over
	// the cap a connection is closed at once and counted (reason
	// "max_handshakes"). Default 0: DefaultMaxHandshakes (256); must be >= 0.
	MaxHandshakes int
	// RefusalInterval is how long refused pre-authentication attempts
	// (garbage, failed or timed-out handshakes, certificates that do not
	// verify, attempts over a limit or while the audit log fails) are
	// aggregated before one audit.Refusals record per source address is
	// written, with one summary log line. Default 0: 10s; must be >= 0.
	RefusalInterval time.Duration
	// RefusalSources caps the source addresses aggregated per interval;
	// attempts from further sources share one record (source "other"). It
	// bounds the aggregator's memory and the records per interval. Default
	// 0: DefaultRefusalSources (256); must be >= 0.
	RefusalSources int
	// AuditAck says when a new connection's handshake record counts as
	// written: AuditAckDurable (default "") once it is fsynced, so no
	// connection carries traffic unrecorded even across a crash;
	// AuditAckQueued once it is queued (cheaper; for measuring the cost).
	AuditAck AuditAck
	// Revocation, when set, is called on every handshake in both
	// directions, resumed ones included, before the deny-list check. A
	// non-nil error (typically: the deny-list has not been confirmed for
	// longer than the configured staleness) refuses the handshake with
	// reason revocation_stale: a proxy that may have missed a revocation
	// fails closed. It must not block on I/O and must be safe for
	// concurrent use. Default nil: no freshness requirement.
	Revocation func() error
	// TicketKeyPeriod is how long a session-ticket key encrypts new tickets;
	// it then decrypts for one more period and is erased, so a ticket
	// resumes for at most two periods. It is capped at half the lifetime
	// of the SVID in use, re-read at every rotation check, so short-lived
	// SVIDs get proportionally short tickets. Default 1h; must be >= 0.
	TicketKeyPeriod time.Duration
	// Transports lists the tunnel transports this proxy offers and
	// accepts, most preferred first: TransportTLS, TransportH2,
	// TransportQUIC. A captured connection uses the first of them that the
	// Directory says its peer accepts (Peer.Transports), else tls; a Route
	// names its own. The tunnel listener always accepts tls; with h2 it
	// also negotiates HTTP/2 on the same TCP port, and with quic the proxy
	// listens on the UDP port of the same number (TunnelListen's host and
	// port): without quic no UDP socket is opened. Default nil: ["tls"].
	Transports []string
	// DisableResumption turns TLS session resumption off on every
	// transport: no session ticket is issued or offered, every handshake
	// is a full one (for benchmarking full handshakes, or for operators
	// who want none). Default false: sessions resume (docs/tunnel.md).
	DisableResumption bool
	// StreamAudit writes a connection record (audit.Connection, with its
	// transport) for every stream of a pooled transport (h2, quic) when it
	// closes. The handshake record of the pooled connection, the records
	// of refused streams and the tls transport's per-connection records
	// are written regardless. Default false: a stream that was allowed
	// leaves no record of its own, so auditing does not cost per stream.
	StreamAudit bool
	// PoolMaxStreams is how many streams one pooled connection (h2, quic)
	// carries at once, in each direction: outbound, a stream past it goes
	// to another connection (dialed if none has room); inbound it is what
	// the peer is allowed (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS, QUIC's
	// stream credit), so a peer cannot open more. Default 250; range
	// 0..65535 (0: the default).
	PoolMaxStreams int
	// PoolMaxBytes is how many payload bytes (both ways, all streams) a
	// pooled connection carries before new streams go to a fresh
	// connection. Default 64 GiB; must be >= 0.
	PoolMaxBytes int64
	// PoolIdleTimeout closes a pooled connection that has carried no
	// stream for this long: outbound after PoolIdleTimeout, inbound 5 s
	// later, so that with equal settings the dialing side closes first.
	// Default 90s; must be >= 0.
	PoolIdleTimeout time.Duration
	// PoolMaxLifetime is how long a pooled connection takes new streams
	// after its handshake; it then drains (its streams finish, new ones go
	// to a fresh connection and handshake, with the current SVID). Never
	// past the earlier NotAfter of the two certificates that authenticated
	// it: both sides stop opening streams up to 2 s before it (less for a
	// connection made with less than 4 s of validity left), and the
	// receiving side refuses a stream after it (reason credential_expired).
	// Measured from the handshake on the certificate clock (Now). Default
	// 1h; must be >= 0.
	PoolMaxLifetime time.Duration
	// QUICKeyUpdateInterval is how many packets QUIC sends or receives
	// with one traffic key before it updates the keys (RFC 9001 section
	// 6). 0 keeps quic-go's default, 100 000 (and quic-go always makes a
	// first update after 100 packets). The setting is process-wide in
	// quic-go: the last proxy created in a process decides it.
	QUICKeyUpdateInterval uint64
	// DisableQUICKeyUpdateCount turns off counting QUIC key updates
	// (agentmesh_proxy_quic_key_updates_total stays 0). quic-go reports
	// them only through its qlog tracing, which then describes every
	// packet sent and received: a few percent of the quic transport's CPU
	// on bulk transfers. Key updates themselves happen either way.
	// Default false: counted.
	DisableQUICKeyUpdateCount bool
	// Now is the clock for certificate validity and session-ticket
	// decisions (chain verification, ticket-key rotation, ticket expiry);
	// deadlines and durations always use the real clock. Default
	// time.Now; tests set it to move through ticket periods without
	// waiting.
	Now func() time.Time
}

// MarkControl returns a net.Dialer.Control that sets SO_MARK to mark on every
// socket before it connects (Linux only), for the proxy's other clients (the CA
// and directory) to carry the same mark as its tunnels, so capture skips them too.
func MarkControl(mark int) func(network, address string, c syscall.RawConn) error {
	return markControl(mark)
}

func (c Config) withDefaults() Config {
	if c.TunnelListen == "" {
		c.TunnelListen = ":15008"
	}
	if c.TargetHost == "" {
		c.TargetHost = "127.0.0.1"
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = 10 * time.Second
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = 5 * time.Second
	}
	if c.TicketKeyPeriod == 0 {
		c.TicketKeyPeriod = time.Hour
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.MaxIntermediates == 0 {
		c.MaxIntermediates = svidrules.DefaultMaxIntermediates
	}
	if len(c.Transports) == 0 {
		c.Transports = []string{TransportTLS}
	} else {
		c.Transports = slices.Clone(c.Transports)
	}
	if c.PoolMaxStreams == 0 {
		c.PoolMaxStreams = 250
	}
	if c.PoolMaxBytes == 0 {
		c.PoolMaxBytes = 64 << 30
	}
	if c.MaxConnections == 0 {
		c.MaxConnections = DefaultMaxConnections
	}
	if c.MaxHandshakes == 0 {
		c.MaxHandshakes = DefaultMaxHandshakes
	}
	if c.RefusalInterval == 0 {
		c.RefusalInterval = DefaultRefusalInterval
	}
	if c.RefusalSources == 0 {
		c.RefusalSources = DefaultRefusalSources
	}
	if c.AuditAck == "" {
		c.AuditAck = AuditAckDurable
	}
	if c.PoolIdleTimeout == 0 {
		c.PoolIdleTimeout = 90 * time.Second
	}
	if c.PoolMaxLifetime == 0 {
		c.PoolMaxLifetime = time.Hour
	}
	if c.Explicit != "" {
		c.Explicit = loopbackIfNoHost(c.Explicit)
	}
	// A copy, so that filling in defaults never writes to the caller's
	// slice.
	c.Routes = slices.Clone(c.Routes)
	for i := range c.Routes {
		c.Routes[i].Listen = loopbackIfNoHost(c.Routes[i].Listen)
		if c.Routes[i].Transport == "" {
			c.Routes[i].Transport = TransportTLS
		}
	}
	return c
}

// Validate reports what New would refuse in c's settings, with its defaults applied:
// everything but the components New is given (Credentials, Agents, Policy, Directory,
// Audit), so a configuration can be checked before they exist. Errors wrap
// ErrInvalidConfig. It opens nothing.
func (c Config) Validate() error { return c.withDefaults().validateSettings() }

// validate checks a Config after withDefaults. Errors wrap ErrInvalidConfig.
func (c Config) validate() error {
	if err := c.validateSettings(); err != nil {
		return err
	}
	if c.Credentials == nil {
		return fmt.Errorf("%w: Credentials is required", ErrInvalidConfig)
	}
	return nil
}

// validateSettings is validate but for the components.
func (c Config) validateSettings() error {
	switch {
	case c.ID.IsZero():
		return fmt.Errorf("%w: ID is required", ErrInvalidConfig)
	case c.HandshakeTimeout < 0:
		return fmt.Errorf("%w: HandshakeTimeout %s is negative", ErrInvalidConfig, c.HandshakeTimeout)
	case c.DialTimeout < 0:
		return fmt.Errorf("%w: DialTimeout %s is negative", ErrInvalidConfig, c.DialTimeout)
	case c.TicketKeyPeriod < 0:
		return fmt.Errorf("%w: TicketKeyPeriod %s is negative", ErrInvalidConfig, c.TicketKeyPeriod)
	case c.MaxIntermediates < 0 || c.MaxIntermediates > svidrules.MaxIntermediatesLimit:
		return fmt.Errorf("%w: MaxIntermediates %d is outside 0..%d", ErrInvalidConfig, c.MaxIntermediates, svidrules.MaxIntermediatesLimit)
	case c.MaxConnections < 0:
		return fmt.Errorf("%w: MaxConnections %d is negative", ErrInvalidConfig, c.MaxConnections)
	case c.MaxHandshakes < 0:
		return fmt.Errorf("%w: MaxHandshakes %d is negative", ErrInvalidConfig, c.MaxHandshakes)
	case c.RefusalInterval < 0:
		return fmt.Errorf("%w: RefusalInterval %s is negative", ErrInvalidConfig, c.RefusalInterval)
	case c.RefusalSources < 0:
		return fmt.Errorf("%w: RefusalSources %d is negative", ErrInvalidConfig, c.RefusalSources)
	case c.AuditAck != AuditAckDurable && c.AuditAck != AuditAckQueued:
		return fmt.Errorf("%w: AuditAck %q is not durable or queued", ErrInvalidConfig, c.AuditAck)
	case c.Unknown != UnknownDeny && c.Unknown != UnknownPassthrough:
		return fmt.Errorf("%w: Unknown %s is not a policy", ErrInvalidConfig, c.Unknown)
	case c.Unattested != UnattestedHost && c.Unattested != UnattestedDeny:
		return fmt.Errorf("%w: Unattested %s is not a policy", ErrInvalidConfig, c.Unattested)
	case c.Mark < 0 || int64(c.Mark) > math.MaxUint32:
		return fmt.Errorf("%w: Mark %d is outside 0..%d", ErrInvalidConfig, c.Mark, uint32(math.MaxUint32))
	case c.Mark != 0 && !markSupported:
		return fmt.Errorf("%w: Mark needs Linux", ErrInvalidConfig)
	case c.Outbound != "" && !origDstSupported:
		return fmt.Errorf("%w: Outbound (transparent capture) needs Linux", ErrInvalidConfig)
	case c.PoolMaxStreams < 0 || c.PoolMaxStreams > math.MaxUint16:
		return fmt.Errorf("%w: PoolMaxStreams %d is outside 0..%d", ErrInvalidConfig, c.PoolMaxStreams, math.MaxUint16)
	case c.PoolMaxBytes < 0:
		return fmt.Errorf("%w: PoolMaxBytes %d is negative", ErrInvalidConfig, c.PoolMaxBytes)
	case c.PoolIdleTimeout < 0:
		return fmt.Errorf("%w: PoolIdleTimeout %s is negative", ErrInvalidConfig, c.PoolIdleTimeout)
	case c.PoolMaxLifetime < 0:
		return fmt.Errorf("%w: PoolMaxLifetime %s is negative", ErrInvalidConfig, c.PoolMaxLifetime)
	}
	if err := validateTransports(c.Transports); err != nil {
		return err
	}
	for i, r := range c.Routes {
		switch {
		case r.Listen == "":
			return fmt.Errorf("%w: route %d: Listen is required", ErrInvalidConfig, i)
		case r.PeerID.IsZero():
			return fmt.Errorf("%w: route %d: PeerID is required", ErrInvalidConfig, i)
		case r.TargetPort == 0:
			return fmt.Errorf("%w: route %d: TargetPort is required", ErrInvalidConfig, i)
		case !knownTransport(r.Transport):
			return fmt.Errorf("%w: route %d: unknown Transport %q (tls, h2 or quic)", ErrInvalidConfig, i, r.Transport)
		case !c.offers(r.Transport):
			return fmt.Errorf("%w: route %d: Transport %q is not in Transports", ErrInvalidConfig, i, r.Transport)
		}
		if _, _, err := net.SplitHostPort(r.Peer); err != nil {
			return fmt.Errorf("%w: route %d: Peer %q: %w", ErrInvalidConfig, i, r.Peer, err)
		}
	}
	seen := make(map[uint16]bool, len(c.Services))
	for _, s := range c.Services {
		switch {
		case s.Port == 0:
			return fmt.Errorf("%w: service: Port is required", ErrInvalidConfig)
		case seen[s.Port]:
			return fmt.Errorf("%w: service port %d listed twice", ErrInvalidConfig, s.Port)
		case len(s.Allow) == 0:
			return fmt.Errorf("%w: service port %d: Allow is empty", ErrInvalidConfig, s.Port)
		}
		for _, id := range s.Allow {
			if id.IsZero() {
				return fmt.Errorf("%w: service port %d: zero SPIFFE ID in Allow", ErrInvalidConfig, s.Port)
			}
		}
		seen[s.Port] = true
	}
	return nil
}
