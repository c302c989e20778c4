package node

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/svidrules"
	"github.com/agentmesh/agentmesh/policy"
	"github.com/agentmesh/agentmesh/proxy"
)

// Config is `agentmesh proxy --config FILE`, decoded once: the YAML fields below, with
// relative paths resolved against the file's directory and defaults filled in by
// LoadConfig, plus the typed values it derives from them (unexported).
type Config struct {
	ID       string     `yaml:"id"`
	State    string     `yaml:"state"`
	CA       CASettings `yaml:"ca"`
	Tunnel   string     `yaml:"tunnel"`
	Admin    string     `yaml:"admin"`
	Outbound string     `yaml:"outbound"`
	Explicit string     `yaml:"explicit"`
	Strict   string     `yaml:"strict"`
	Unknown  string     `yaml:"unknown"`
	// Unattested is what happens to a captured connection of a uid no agent is
	// registered for: "deny" (default) refuses it, "host" presents the host identity.
	Unattested string `yaml:"unattested"`
	// Policy is the authorization policy file, reloaded on SIGHUP and on change.
	Policy string `yaml:"policy"`
	Mark   int    `yaml:"mark"`
	// Keys is where SVID keys and the audit log's signing key live: "softhsm" (default: a
	// SoftHSM2 token in STATE/hsm; the host identity survives a restart), a pkcs11: URI
	// (that token, likewise), or "memory" (lost with the process: every start needs a new
	// bootstrap token, and the CA refuses the new audit key until it forgets the log).
	Keys string `yaml:"keys"`
	// Transports are the tunnel transports this proxy accepts and prefers, most
	// preferred first: tls, h2, quic. Default [tls].
	Transports []string `yaml:"transports"`
	// Resumption turns TLS session resumption on the tls transport on or off. Default on.
	Resumption *bool `yaml:"resumption"`
	// QUICKeyUpdateInterval is the number of packets per QUIC traffic key; 0: quic-go's default.
	QUICKeyUpdateInterval uint64                `yaml:"quic_key_update_interval"`
	TLS                   TLSSettings           `yaml:"tls"`
	Directory             DirectorySettings     `yaml:"directory"`
	Revocation            RevocationSettings    `yaml:"revocation"`
	Audit                 AuditSettings         `yaml:"audit"`
	Pool                  PoolSettings          `yaml:"pool"`
	Limits                LimitsSettings        `yaml:"limits"`
	Log                   LogSettings           `yaml:"log"`
	Rotation              policy.RotationPolicy `yaml:"rotation"`
	Routes                []RouteSettings       `yaml:"routes"`
	Services              []ServiceSettings     `yaml:"services"`

	path       string // the file, watched for changes
	id         spiffeid.ID
	unknown    proxy.UnknownPolicy
	unattested proxy.UnattestedPolicy
	advertise  []netip.Addr
	routes     []proxy.Route
	services   []proxy.Service
}

// CASettings is how the proxy reaches agentmesh ca.
type CASettings struct {
	URL       string `yaml:"url"`
	Root      string `yaml:"root"`
	TokenFile string `yaml:"token_file"`
}

// DirectorySettings is what the proxy registers in the mesh directory.
type DirectorySettings struct {
	Advertise []string      `yaml:"advertise"`
	Heartbeat time.Duration `yaml:"heartbeat"`
}

// RevocationSettings tunes the deny-list feed.
type RevocationSettings struct {
	// Poll is the interval of the deny-list poll that backs up the directory's watch.
	Poll time.Duration `yaml:"poll"`
	// MaxStaleness is how old the last confirmed deny-list may be before new
	// handshakes are refused. 0: one SVID lifetime.
	MaxStaleness time.Duration `yaml:"max_staleness"`
}

// TLSSettings limits what peers' chains may carry.
type TLSSettings struct {
	// MaxIntermediates is how many intermediates a peer's chain may carry: 0 (default)
	// means 1, the mesh's own; at most 4, for chains through cross-signed roots.
	MaxIntermediates int `yaml:"max_intermediates"`
}

// AuditSettings places and tunes the audit log.
type AuditSettings struct {
	Path string `yaml:"path"`
	// Streams adds a record per proxied stream of the pooled transports.
	Streams bool `yaml:"streams"`
	// Ack is when a new connection's handshake record counts as written: "durable"
	// (default: fsynced) or "queued" (for measuring what durability costs).
	Ack proxy.AuditAck `yaml:"ack"`
	// CheckpointRecords and CheckpointInterval are how often the log signs a checkpoint
	// and sends it to the CA to be witnessed: every so many records or so long,
	// whichever comes first, while it grows. 0: 1000 records and 10s; the interval is
	// at least 100ms.
	CheckpointRecords  int           `yaml:"checkpoint_records"`
	CheckpointInterval time.Duration `yaml:"checkpoint_interval"`
	// MaxFileBytes is the size past which the active file becomes a segment and a new
	// one continues the same tree. 0: 64 MiB; at least 64 KiB.
	MaxFileBytes int64 `yaml:"max_file_bytes"`
}

// LimitsSettings bounds what unauthenticated peers can make the proxy hold
// (docs/limits.md). Zero means the default.
type LimitsSettings struct {
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

// PoolSettings limits the pooled connections of the h2 and quic transports, on both
// sides (proxy.Config.PoolMaxLifetime, PoolMaxStreams, PoolIdleTimeout); 0 takes the
// default.
type PoolSettings struct {
	// MaxLifetime is how long a pooled connection takes new streams (never past the
	// earlier NotAfter of its two certificates). Default 1h.
	MaxLifetime time.Duration `yaml:"max_lifetime"`
	// MaxStreams is how many streams one pooled connection carries at once. Default 250,
	// at most 65535.
	MaxStreams int `yaml:"max_streams"`
	// IdleTimeout closes a pooled connection without streams for this long. Default 90s.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
}

// LogSettings is the process log's level (debug, info, warn, error) and format (text,
// json).
type LogSettings struct {
	Level  string `yaml:"level"`
	Format string `yaml:"format"`
}

// SlogLevel is the level as log/slog names it; Info when unset.
func (l LogSettings) SlogLevel() (slog.Level, error) {
	var level slog.Level
	if l.Level == "" {
		return slog.LevelInfo, nil
	}
	if err := level.UnmarshalText([]byte(strings.ToUpper(l.Level))); err != nil {
		return 0, fmt.Errorf("unknown level %q (debug, info, warn, error)", l.Level)
	}
	return level, nil
}

// RouteSettings is one route of the file (proxy.Route once validated).
type RouteSettings struct {
	Listen     string `yaml:"listen"`
	Peer       string `yaml:"peer"`
	PeerID     string `yaml:"peer_id"`
	TargetPort int    `yaml:"target_port"`
	Transport  string `yaml:"transport"`
}

// ServiceSettings is one service of the file (proxy.Service once validated).
type ServiceSettings struct {
	Port  int      `yaml:"port"`
	Allow []string `yaml:"allow"`
}

// LoadConfig reads and validates a proxy configuration file. Every error is a
// *FileError naming the file, and where it can, the line and the field.
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return parseConfig(path, data)
}

// parseConfig decodes data, the content of path, and validates it.
func parseConfig(path string, data []byte) (*Config, error) {
	c := &Config{path: path}
	doc, err := decodeYAML(path, data, c)
	if err != nil {
		return nil, err
	}
	if err := c.finish(filepath.Dir(path)); err != nil {
		var fe *fieldErr
		if errors.As(err, &fe) {
			return nil, doc.fieldError(fe.field, fe.err)
		}
		return nil, &FileError{File: path, Err: err}
	}
	// The proxy's own rules, so that a reload refuses what a start would.
	if err := c.proxyConfig().Validate(); err != nil {
		return nil, &FileError{File: path, Err: err}
	}
	return c, nil
}

// fieldErr is a validation failure of one field, located in the file by parseConfig.
type fieldErr struct {
	field string
	err   error
}

func (e *fieldErr) Error() string { return e.field + ": " + e.err.Error() }

func fieldError(field string, err error) error { return &fieldErr{field: field, err: err} }

// finish resolves paths against base, fills in defaults, derives the typed values and
// validates every section, each by its own method.
func (c *Config) finish(base string) error {
	c.State, c.CA.Root, c.CA.TokenFile = resolve(base, c.State), resolve(base, c.CA.Root), resolve(base, c.CA.TokenFile)
	c.Policy, c.Audit.Path = resolve(base, c.Policy), resolve(base, c.Audit.Path)
	c.Tunnel, c.Admin = orDefault(c.Tunnel, ":15008"), orDefault(c.Admin, "127.0.0.1:15020")
	var err error
	if c.id, err = parseID(c.ID); err != nil {
		return fieldError("id", err)
	}
	if c.State == "" {
		return fieldError("state", errors.New("required: the proxy's state directory"))
	}
	if c.Audit.Path == "" {
		c.Audit.Path = filepath.Join(c.State, "audit.log")
	}
	for _, check := range []func() error{c.CA.validate, c.validateListeners, c.validatePolicies, c.validateTunnels,
		c.Directory.validate, c.Audit.validate, c.Limits.validate, c.Revocation.validate, c.Pool.validate,
		c.validateRotation, c.Log.validate} {
		if err := check(); err != nil {
			return err
		}
	}
	if c.advertise, err = c.Directory.addresses(); err != nil {
		return err
	}
	if c.routes, err = convert("routes", c.Routes, RouteSettings.route); err != nil {
		return err
	}
	c.services, err = convert("services", c.Services, ServiceSettings.service)
	return err
}

func (s CASettings) validate() error {
	if u, err := url.Parse(s.URL); err != nil || u.Scheme != "https" || u.Host == "" {
		return fieldError("ca.url", errors.New("must be an https:// URL of agentmesh ca"))
	}
	if s.Root == "" {
		return fieldError("ca.root", errors.New("required: the CA's root certificate file"))
	}
	return nil
}

func (c *Config) validateListeners() error {
	for _, l := range []struct{ field, addr string }{{"tunnel", c.Tunnel}, {"admin", c.Admin},
		{"outbound", c.Outbound}, {"explicit", c.Explicit}, {"strict", c.Strict}} {
		if l.addr == "" && l.field != "tunnel" && l.field != "admin" {
			continue
		}
		if err := checkHostPort(l.addr); err != nil {
			return fieldError(l.field, err)
		}
	}
	if c.Mark < 0 || int64(c.Mark) > 0xffffffff {
		return fieldError("mark", errors.New("must be a 32-bit firewall mark"))
	}
	return nil
}

func (c *Config) validatePolicies() error {
	switch c.Unknown {
	case "", "deny":
		c.unknown = proxy.UnknownDeny
	case "passthrough":
		c.unknown = proxy.UnknownPassthrough
	default:
		return fieldError("unknown", fmt.Errorf(`must be "deny" or "passthrough", not %q`, c.Unknown))
	}
	switch c.Unattested {
	case "", "deny":
		c.unattested = proxy.UnattestedDeny
	case "host":
		c.unattested = proxy.UnattestedHost
	default:
		return fieldError("unattested", fmt.Errorf(`must be "deny" or "host", not %q`, c.Unattested))
	}
	if c.Keys != "" && c.Keys != "memory" && c.Keys != "softhsm" && !strings.HasPrefix(c.Keys, "pkcs11:") {
		return fieldError("keys", fmt.Errorf(`must be "memory", "softhsm" or a pkcs11: URI, not %q`, c.Keys))
	}
	return nil
}

func (c *Config) validateTunnels() error {
	for i, tr := range c.Transports {
		if !knownTransport(tr) {
			return fieldError(fmt.Sprintf("transports[%d]", i), fmt.Errorf("unknown transport %q: tls, h2 or quic", tr))
		}
	}
	if n := c.TLS.MaxIntermediates; n < 0 || n > svidrules.MaxIntermediatesLimit {
		return fieldError("tls.max_intermediates", fmt.Errorf("must be 0 (default: 1) to %d", svidrules.MaxIntermediatesLimit))
	}
	return nil
}

func (s DirectorySettings) validate() error {
	if s.Heartbeat < 0 {
		return fieldError("directory.heartbeat", errors.New("must not be negative"))
	}
	return nil
}

func (s DirectorySettings) addresses() ([]netip.Addr, error) {
	var out []netip.Addr
	for i, a := range s.Advertise {
		ip, err := netip.ParseAddr(a)
		if err != nil || ip.IsUnspecified() || ip.IsMulticast() {
			return nil, fieldError(fmt.Sprintf("directory.advertise[%d]", i), fmt.Errorf("not a unicast IP address: %q", a))
		}
		out = append(out, ip.Unmap())
	}
	return out, nil
}

func (s AuditSettings) validate() error {
	switch s.Ack {
	case "", proxy.AuditAckDurable, proxy.AuditAckQueued:
	default:
		return fieldError("audit.ack", fmt.Errorf(`must be "durable" or "queued", not %q`, s.Ack))
	}
	return validateCheckpoints(s.CheckpointRecords, s.CheckpointInterval, s.MaxFileBytes)
}

func (s LimitsSettings) validate() error {
	return notNegative("limits.", []field{{"max_connections", int64(s.MaxConnections)},
		{"max_handshakes_in_flight", int64(s.MaxHandshakesInFlight)},
		{"refusal_interval", int64(s.RefusalInterval)}, {"refusal_sources", int64(s.RefusalSources)}},
		"must not be negative (0: the default)")
}

func (s RevocationSettings) validate() error {
	return notNegative("revocation.", []field{{"poll", int64(s.Poll)}, {"max_staleness", int64(s.MaxStaleness)}},
		"must not be negative")
}

func (s PoolSettings) validate() error {
	if s.MaxLifetime < 0 {
		return fieldError("pool.max_lifetime", errors.New("must not be negative"))
	}
	if s.MaxStreams < 0 || s.MaxStreams > 65535 {
		return fieldError("pool.max_streams", errors.New("must be within 0..65535"))
	}
	if s.IdleTimeout < 0 {
		return fieldError("pool.idle_timeout", errors.New("must not be negative"))
	}
	return nil
}

func (c *Config) validateRotation() error {
	if err := c.Rotation.Validate(); err != nil {
		var fe *policy.FieldError
		if errors.As(err, &fe) {
			return fieldError("rotation."+fe.Field, errors.New(fe.Reason))
		}
		return fieldError("rotation", err)
	}
	return nil
}

func (l LogSettings) validate() error {
	if _, err := l.SlogLevel(); err != nil {
		return fieldError("log.level", err)
	}
	if l.Format != "" && l.Format != "json" && l.Format != "text" {
		return fieldError("log.format", errors.New(`must be "json" or "text"`))
	}
	return nil
}

// field is a named number that must not be negative.
type field struct {
	name string
	n    int64
}

func notNegative(section string, fields []field, reason string) error {
	for _, f := range fields {
		if f.n < 0 {
			return fieldError(section+f.name, errors.New(reason))
		}
	}
	return nil
}
