package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/svidrules"
	"github.com/agentmesh/agentmesh/policy"
	"github.com/agentmesh/agentmesh/proxy"
)

// proxyFile is the YAML shape of `agentmesh proxy --config FILE`.
type proxyFile struct {
	ID       string `yaml:"id"`
	State    string `yaml:"state"`
	CA       caFile `yaml:"ca"`
	Tunnel   string `yaml:"tunnel"`
	Admin    string `yaml:"admin"`
	Outbound string `yaml:"outbound"`
	Explicit string `yaml:"explicit"`
	Strict   string `yaml:"strict"`
	Unknown  string `yaml:"unknown"`
	// Unattested is what happens to a captured connection of a uid no agent is
	// registered for: "deny" (default) refuses it, "host" presents the host identity.
	Unattested string `yaml:"unattested"`
	// Policy is the authorization policy file, reloaded on SIGHUP and on change.
	Policy string `yaml:"policy"`
	Mark   int    `yaml:"mark"`
	// Keys is where SVID keys live: "softhsm" (default: a SoftHSM2 token in STATE/hsm;
	// the host identity survives a restart), a pkcs11: URI (that token, likewise), or
	// "memory" (lost with the process: every start needs a new bootstrap token).
	Keys string `yaml:"keys"`
	// Transports are the tunnel transports this proxy accepts and prefers, most
	// preferred first: tls, h2, quic. Default [tls].
	Transports []string `yaml:"transports"`
	// Resumption turns TLS session resumption on the tls transport on or off. Default on.
	Resumption *bool `yaml:"resumption"`
	// QUICKeyUpdateInterval is the number of packets per QUIC traffic key; 0: quic-go's default.
	QUICKeyUpdateInterval uint64          `yaml:"quic_key_update_interval"`
	TLS                   tlsFile         `yaml:"tls"`
	Dir                   directoryFile   `yaml:"directory"`
	Revoke                revocationFile  `yaml:"revocation"`
	Audit                 auditFile       `yaml:"audit"`
	Pool                  poolFile        `yaml:"pool"`
	Limits                limitsFile      `yaml:"limits"`
	Log                   logFile         `yaml:"log"`
	Rotation              policy.Rotation `yaml:"rotation"`
	Routes                []routeFile     `yaml:"routes"`
	Services              []serviceFile   `yaml:"services"`
}

type caFile struct {
	URL       string `yaml:"url"`
	Root      string `yaml:"root"`
	TokenFile string `yaml:"token_file"`
}

type directoryFile struct {
	Advertise []string      `yaml:"advertise"`
	Heartbeat time.Duration `yaml:"heartbeat"`
}

type revocationFile struct {
	// Poll is the interval of the deny-list poll that backs up the directory's watch.
	Poll time.Duration `yaml:"poll"`
	// MaxStaleness is how old the last confirmed deny-list may be before new
	// handshakes are refused. 0: one SVID lifetime.
	MaxStaleness time.Duration `yaml:"max_staleness"`
}

type tlsFile struct {
	// MaxIntermediates is how many intermediates a peer's chain may carry: 0 (default)
	// means 1, the mesh's own; at most 4, for chains through cross-signed roots.
	MaxIntermediates int `yaml:"max_intermediates"`
}

type auditFile struct {
	Path string `yaml:"path"`
	// Streams adds a record per proxied stream of the pooled transports.
	Streams bool `yaml:"streams"`
	// Ack is when a new connection's handshake record counts as written: "durable"
	// (default: fsynced) or "queued" (for measuring what durability costs).
	Ack string `yaml:"ack"`
}

// limitsFile bounds what unauthenticated peers can make the proxy hold (docs/limits.md).
// Zero means the default.
type limitsFile struct {
	// MaxConnections caps open connections, tls, h2 and quic tunnels and capture listeners
	// together. Default 4096.
	MaxConnections int `yaml:"max_connections"`
	// MaxHandshakesInFlight caps inbound handshakes in progress. Default 256.
	MaxHandshakesInFlight int `yaml:"max_handshakes_in_flight"`
	// RefusalInterval is how long refused pre-authentication attempts are aggregated per
	// source before their audit record is written. Default 10s.
	RefusalInterval time.Duration `yaml:"refusal_interval"`
	// RefusalSources caps the sources aggregated per interval; the rest share one record.
	// Default 256.
	RefusalSources int `yaml:"refusal_sources"`
}

// poolFile limits the pooled connections of the h2 and quic transports, on both sides
// (proxy.Config.PoolMaxLifetime, PoolMaxStreams, PoolIdleTimeout); 0 takes the default.
type poolFile struct {
	// MaxLifetime is how long a pooled connection takes new streams (never past the
	// earlier NotAfter of its two certificates). Default 1h.
	MaxLifetime time.Duration `yaml:"max_lifetime"`
	// MaxStreams is how many streams one pooled connection carries at once. Default 250,
	// at most 65535.
	MaxStreams int `yaml:"max_streams"`
	// IdleTimeout closes a pooled connection without streams for this long. Default 90s.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
}

type logFile struct {
	Level  string `yaml:"level"`
	Format string `yaml:"format"`
}

type routeFile struct {
	Listen     string `yaml:"listen"`
	Peer       string `yaml:"peer"`
	PeerID     string `yaml:"peer_id"`
	TargetPort int    `yaml:"target_port"`
	Transport  string `yaml:"transport"`
}

type serviceFile struct {
	Port  int      `yaml:"port"`
	Allow []string `yaml:"allow"`
}

// proxyConfig is a validated proxy configuration with paths resolved.
type proxyConfig struct {
	ID          spiffeid.ID
	State       string
	CAURL       string
	CARoot      string
	TokenFile   string
	Tunnel      string
	Admin       string
	Outbound    string
	Explicit    string
	Strict      string
	Unknown     proxy.UnknownPolicy
	Unattested  proxy.UnattestedPolicy
	PolicyPath  string
	Mark        int
	Keys        string
	Transports  []string
	NoResume    bool
	QUICKeys    uint64
	MaxInter    int
	StreamAudit bool
	Pool        poolFile
	Advertise   []netip.Addr
	Heartbeat   time.Duration
	Poll        time.Duration
	Staleness   time.Duration
	AuditPath   string
	AuditAck    proxy.AuditAck
	Limits      limitsFile
	Log         logFile
	Rotation    policy.Rotation
	Routes      []proxy.Route
	Services    []proxy.Service
}

// loadProxyConfig reads and validates a proxy configuration file. Every error names the
// file, and where it can, the line and the field.
func loadProxyConfig(path string) (*proxyConfig, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	var f proxyFile
	doc, err := decodeYAML(path, data, &f)
	if err != nil {
		return nil, err
	}
	return f.validate(doc, filepath.Dir(path))
}

func (f *proxyFile) validate(doc *yamlDoc, base string) (*proxyConfig, error) {
	c := &proxyConfig{
		State:       resolve(base, f.State),
		CAURL:       f.CA.URL,
		CARoot:      resolve(base, f.CA.Root),
		TokenFile:   resolve(base, f.CA.TokenFile),
		Tunnel:      orDefault(f.Tunnel, ":15008"),
		Admin:       orDefault(f.Admin, "127.0.0.1:15020"),
		Outbound:    f.Outbound,
		Explicit:    f.Explicit,
		Strict:      f.Strict,
		PolicyPath:  resolve(base, f.Policy),
		Mark:        f.Mark,
		Keys:        f.Keys,
		Transports:  f.Transports,
		NoResume:    f.Resumption != nil && !*f.Resumption,
		QUICKeys:    f.QUICKeyUpdateInterval,
		MaxInter:    f.TLS.MaxIntermediates,
		StreamAudit: f.Audit.Streams,
		Pool:        f.Pool,
		Heartbeat:   f.Dir.Heartbeat,
		Poll:        f.Revoke.Poll,
		Staleness:   f.Revoke.MaxStaleness,
		AuditPath:   resolve(base, f.Audit.Path),
		AuditAck:    proxy.AuditAck(f.Audit.Ack),
		Limits:      f.Limits,
		Log:         f.Log,
		Rotation:    f.Rotation,
	}
	var err error
	if c.ID, err = parseID(f.ID); err != nil {
		return nil, doc.fieldError("id", err)
	}
	if f.State == "" {
		return nil, doc.fieldError("state", errors.New("required: the proxy's state directory"))
	}
	if c.AuditPath == "" {
		c.AuditPath = filepath.Join(c.State, "audit.log")
	}
	if u, err := url.Parse(f.CA.URL); err != nil || u.Scheme != "https" || u.Host == "" {
		return nil, doc.fieldError("ca.url", errors.New("must be an https:// URL of agentmesh ca"))
	}
	if f.CA.Root == "" {
		return nil, doc.fieldError("ca.root", errors.New("required: the CA's root certificate file"))
	}
	if err := checkHostPort(c.Tunnel); err != nil {
		return nil, doc.fieldError("tunnel", err)
	}
	if err := checkHostPort(c.Admin); err != nil {
		return nil, doc.fieldError("admin", err)
	}
	for _, l := range []struct{ field, addr string }{{"outbound", f.Outbound}, {"explicit", f.Explicit}, {"strict", f.Strict}} {
		if l.addr == "" {
			continue
		}
		if err := checkHostPort(l.addr); err != nil {
			return nil, doc.fieldError(l.field, err)
		}
	}
	switch f.Unknown {
	case "", "deny":
		c.Unknown = proxy.UnknownDeny
	case "passthrough":
		c.Unknown = proxy.UnknownPassthrough
	default:
		return nil, doc.fieldError("unknown", fmt.Errorf(`must be "deny" or "passthrough", not %q`, f.Unknown))
	}
	switch f.Unattested {
	case "", "deny":
		c.Unattested = proxy.UnattestedDeny
	case "host":
		c.Unattested = proxy.UnattestedHost
	default:
		return nil, doc.fieldError("unattested", fmt.Errorf(`must be "deny" or "host", not %q`, f.Unattested))
	}
	if f.Keys != "" && f.Keys != "memory" && f.Keys != "softhsm" && !strings.HasPrefix(f.Keys, "pkcs11:") {
		return nil, doc.fieldError("keys", fmt.Errorf(`must be "memory", "softhsm" or a pkcs11: URI, not %q`, f.Keys))
	}
	for i, tr := range f.Transports {
		if !knownTransport(tr) {
			return nil, doc.fieldError(fmt.Sprintf("transports[%d]", i), fmt.Errorf("unknown transport %q: tls, h2 or quic", tr))
		}
	}
	if n := f.TLS.MaxIntermediates; n < 0 || n > svidrules.MaxIntermediatesLimit {
		return nil, doc.fieldError("tls.max_intermediates", fmt.Errorf("must be 0 (default: 1) to %d", svidrules.MaxIntermediatesLimit))
	}
	if f.Mark < 0 || int64(f.Mark) > 0xffffffff {
		return nil, doc.fieldError("mark", errors.New("must be a 32-bit firewall mark"))
	}
	for i, a := range f.Dir.Advertise {
		ip, err := netip.ParseAddr(a)
		if err != nil || ip.IsUnspecified() || ip.IsMulticast() {
			return nil, doc.fieldError(fmt.Sprintf("directory.advertise[%d]", i), fmt.Errorf("not a unicast IP address: %q", a))
		}
		c.Advertise = append(c.Advertise, ip.Unmap())
	}
	if f.Dir.Heartbeat < 0 {
		return nil, doc.fieldError("directory.heartbeat", errors.New("must not be negative"))
	}
	switch c.AuditAck {
	case "", proxy.AuditAckDurable, proxy.AuditAckQueued:
	default:
		return nil, doc.fieldError("audit.ack", fmt.Errorf(`must be "durable" or "queued", not %q`, f.Audit.Ack))
	}
	for _, l := range []struct {
		field string
		n     int64
	}{
		{"limits.max_connections", int64(f.Limits.MaxConnections)},
		{"limits.max_handshakes_in_flight", int64(f.Limits.MaxHandshakesInFlight)},
		{"limits.refusal_interval", int64(f.Limits.RefusalInterval)},
		{"limits.refusal_sources", int64(f.Limits.RefusalSources)},
	} {
		if l.n < 0 {
			return nil, doc.fieldError(l.field, errors.New("must not be negative (0: the default)"))
		}
	}
	if f.Revoke.Poll < 0 {
		return nil, doc.fieldError("revocation.poll", errors.New("must not be negative"))
	}
	if f.Revoke.MaxStaleness < 0 {
		return nil, doc.fieldError("revocation.max_staleness", errors.New("must not be negative"))
	}
	if f.Pool.MaxLifetime < 0 {
		return nil, doc.fieldError("pool.max_lifetime", errors.New("must not be negative"))
	}
	if f.Pool.MaxStreams < 0 || f.Pool.MaxStreams > 65535 {
		return nil, doc.fieldError("pool.max_streams", errors.New("must be within 0..65535"))
	}
	if f.Pool.IdleTimeout < 0 {
		return nil, doc.fieldError("pool.idle_timeout", errors.New("must not be negative"))
	}
	if err := f.Rotation.Validate(); err != nil {
		var fe *policy.FieldError
		if errors.As(err, &fe) {
			return nil, doc.fieldError("rotation."+fe.Field, errors.New(fe.Reason))
		}
		return nil, doc.fieldError("rotation", err)
	}
	if _, err := parseLevel(f.Log.Level); err != nil {
		return nil, doc.fieldError("log.level", err)
	}
	if f.Log.Format != "" && f.Log.Format != "json" && f.Log.Format != "text" {
		return nil, doc.fieldError("log.format", errors.New(`must be "json" or "text"`))
	}
	for i, r := range f.Routes {
		route, field, err := r.route()
		if err != nil {
			return nil, doc.fieldError(fmt.Sprintf("routes[%d].%s", i, field), err)
		}
		c.Routes = append(c.Routes, route)
	}
	for i, s := range f.Services {
		svc, field, err := s.service()
		if err != nil {
			return nil, doc.fieldError(fmt.Sprintf("services[%d].%s", i, field), err)
		}
		c.Services = append(c.Services, svc)
	}
	return c, nil
}

func (r routeFile) route() (proxy.Route, string, error) {
	out := proxy.Route{Listen: r.Listen, Peer: r.Peer}
	if err := checkHostPort(r.Listen); err != nil {
		return out, "listen", err
	}
	if err := checkHostPort(r.Peer); err != nil {
		return out, "peer", err
	}
	id, err := parseID(r.PeerID)
	if err != nil {
		return out, "peer_id", err
	}
	out.PeerID = id
	port, err := checkPort(r.TargetPort)
	if err != nil {
		return out, "target_port", err
	}
	out.TargetPort = port
	if r.Transport != "" && !knownTransport(r.Transport) {
		return out, "transport", fmt.Errorf("unknown transport %q: tls, h2 or quic", r.Transport)
	}
	out.Transport = r.Transport
	return out, "", nil
}

// knownTransport reports whether t names a tunnel transport this build speaks.
func knownTransport(t string) bool { return t == "tls" || t == "h2" || t == "quic" }

func (s serviceFile) service() (proxy.Service, string, error) {
	port, err := checkPort(s.Port)
	if err != nil {
		return proxy.Service{}, "port", err
	}
	out := proxy.Service{Port: port}
	if len(s.Allow) == 0 {
		return out, "allow", errors.New("at least one SPIFFE ID is required (the default is deny)")
	}
	for i, a := range s.Allow {
		id, err := parseID(a)
		if err != nil {
			return out, fmt.Sprintf("allow[%d]", i), err
		}
		out.Allow = append(out.Allow, id)
	}
	return out, "", nil
}

func parseID(s string) (spiffeid.ID, error) {
	if s == "" {
		return spiffeid.ID{}, fmt.Errorf("required: a SPIFFE ID (spiffe://trust-domain/path)")
	}
	id, err := spiffeid.FromString(s)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("invalid SPIFFE ID %q: %w", s, err)
	}
	return id, nil
}

func checkHostPort(addr string) error {
	if addr == "" {
		return errors.New("required: host:port")
	}
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("invalid address %q: %w", addr, err)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("invalid port in %q", addr)
	}
	return nil
}

func checkPort(p int) (uint16, error) {
	if p < 1 || p > 65535 {
		return 0, fmt.Errorf("port %d out of range 1-65535", p)
	}
	return uint16(p), nil
}

func resolve(base, p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(base, p)
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
