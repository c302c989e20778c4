package meshclient

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

// Config configures the mesh clients a proxy runs: the Watch (directory and
// deny-list), the Heartbeat (registration) and AgentTokens. They share how to reach the
// CA (URL, Roots, Certificate, Control, Logger); each reads its own fields.
type Config struct {
	// URL is the https://host:port base URL of agentmesh ca. Required.
	URL string
	// Roots are the trust anchors for the CA's TLS serving certificate and for the
	// CA certificate that signs the deny-list (the CA's root). Required unless
	// Anchors is set.
	Roots []*x509.Certificate
	// Anchors, when set, replace Roots: the anchors held at each handshake and each
	// deny-list verification are used, so the proxy can follow a rotation of the CA's
	// root. Default nil: Roots, fixed.
	Anchors *Anchors
	// Certificate returns the proxy's current SVID (a /host/ ID of the CA's trust
	// domain, or any ID of it without Addresses; Leaf set or not, intermediates after
	// the leaf). Its trust domain is the one whose deny-list is followed. It is called
	// for every request (each request is a new TLS connection), so a rotation applies
	// at the next heartbeat or poll. An error fails that request, which is retried.
	// Required.
	Certificate func() (*tls.Certificate, error)
	// Addresses are the IP addresses this host is reached at, advertised to peers
	// (at most 32). IPv4-mapped IPv6 addresses are unmapped; zoned, unspecified and
	// multicast ones are refused. Heartbeat only; a proxy without them runs no
	// Heartbeat: one that routes by static configuration still runs the Watch, and so
	// follows the directory and the deny-list.
	Addresses []netip.Addr
	// TunnelPort is the port of this proxy's tunnel listener. Required (1-65535)
	// with Addresses.
	TunnelPort uint16
	// Transports are the tunnel transports this proxy accepts, most preferred first.
	// Default ["tls"].
	Transports []string
	// BundleVersion, when set, returns the version of the trust bundle the proxy holds;
	// it is reported with each heartbeat. Default nil: not reported.
	BundleVersion func() string
	// Status, when set, returns this proxy's own state; it is reported with each
	// heartbeat for the CA's fleet view. Identities past meshapi.MaxProxyStatusIdentities,
	// and the last ones while the request would exceed meshapi.MaxRegisterBody, are left
	// out. It is called on the heartbeat's goroutine. Default nil: not reported.
	Status func() *meshapi.ProxyStatus
	// Heartbeat is the interval between registrations (minus up to a tenth of jitter,
	// so that proxies started together spread out), and the cap of the retry backoff.
	// Keep it well under the CA's DirectoryTTL (30s by default). Default 10s.
	Heartbeat time.Duration
	// Control, when set, is called on every socket dialed to the CA before it
	// connects; the proxy sets its SO_MARK there so capture rules skip this traffic.
	// Default nil.
	Control func(network, address string, c syscall.RawConn) error
	// PollInterval is the period (minus up to a tenth of jitter) of the fallback
	// poll of the deny-list, besides the directory watch that delivers new lists at
	// once. It bounds how stale the list gets while the watch is stuck, and two
	// failed polls in a row report the feed unreachable. Default 5s.
	PollInterval time.Duration
	// Audit receives an audit.DenyList record for every deny-list refused (the same
	// refused list arriving again in a row is recorded once); the record of a list
	// applied is its applier's, which knows what applying it closed. Default nil: none.
	Audit interface{ Append(audit.Event) error }
	// Registerer receives the revocation feed's metrics
	// (agentmesh_revocation_*). Default nil: not registered.
	Registerer prometheus.Registerer
	// Logger receives retries at Warn, (re-)registrations, applied deny-lists and
	// fleet rotations at Info, refused deny-lists and an unreachable revocation feed at Error, and
	// applied directory versions at Debug. Default: discard.
	Logger *slog.Logger
}

func (c Config) withDefaults() Config {
	if len(c.Transports) == 0 {
		c.Transports = []string{"tls"}
	}
	if c.Heartbeat == 0 {
		c.Heartbeat = defaultHeartbeat
	}
	if c.PollInterval == 0 {
		c.PollInterval = defaultPollInterval
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// check validates what every mesh client needs and returns where the CA is and what
// verifies it.
func (c Config) check() (caEndpoint, error) {
	ep, err := endpoint(c.URL, c.Roots, c.Anchors)
	switch {
	case err != nil:
		return ep, err
	case c.Certificate == nil:
		return ep, fmt.Errorf("%w: Certificate is required", ErrInvalidConfig)
	case c.Heartbeat < 0:
		return ep, fmt.Errorf("%w: negative Heartbeat", ErrInvalidConfig)
	case c.PollInterval < 0:
		return ep, fmt.Errorf("%w: negative PollInterval", ErrInvalidConfig)
	}
	return ep, nil
}

// registerBody validates the advertised addresses, port and transports and returns
// the register request they make (without the bundle version, which is per request).
func (c Config) registerBody() (meshapi.RegisterRequest, error) {
	body := meshapi.RegisterRequest{TunnelPort: int(c.TunnelPort)}
	switch {
	case len(c.Addresses) > meshapi.MaxAddresses:
		return body, fmt.Errorf("%w: Addresses: at most %d", ErrInvalidConfig, meshapi.MaxAddresses)
	case len(c.Addresses) > 0 && c.TunnelPort == 0:
		return body, fmt.Errorf("%w: TunnelPort is required with Addresses", ErrInvalidConfig)
	}
	addrs := make([]netip.Addr, 0, len(c.Addresses))
	for _, a := range c.Addresses {
		if !a.IsValid() {
			return body, fmt.Errorf("%w: Addresses: invalid address", ErrInvalidConfig)
		}
		if err := meshapi.CheckAdvertisable(a); err != nil {
			return body, fmt.Errorf("%w: Addresses: %w", ErrInvalidConfig, err)
		}
		addrs = append(addrs, a.Unmap())
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	for _, a := range slices.Compact(addrs) {
		body.Addresses = append(body.Addresses, a.String())
	}
	var err error
	if body.Transports, err = meshapi.NormaliseTransports(c.Transports); err != nil {
		return body, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	return body, nil
}
