package ca

import (
	"crypto"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/ca/authority"
)

const (
	defaultListen        = ":9443"
	defaultSVIDLifetime  = time.Hour
	minSVIDLifetime      = authority.MinSVIDLifetime
	defaultTokenLifetime = 5 * time.Minute
	maxTokenLifetime     = 24 * time.Hour
	defaultDirectoryTTL  = 30 * time.Second
	defaultLiveWindow    = 30 * time.Second
	// defaultWitnessStale is three of the proxies' default checkpoint intervals (10s).
	defaultWitnessStale = 30 * time.Second
)

// Config configures a Server. The zero value of every optional field selects the
// documented default.
type Config struct {
	// StateDir holds the CA's state: root.crt, intermediate.crt, the database (db/),
	// the SoftHSM2 token (tokens/, softhsm2.conf, softhsm2.lock; its PIN is PINFile; see
	// hsm.SoftHSM; the module is hsm.SoftHSMModule) unless KMS is set, the lock and
	// the admin socket. Required; created 0700 if missing.
	StateDir string

	// TrustDomain is the SPIFFE trust domain the CA issues for. Required. A state
	// directory belongs to one trust domain for life.
	TrustDomain spiffeid.TrustDomain

	// Listen is the TCP address of step-ca's HTTPS API. Default ":9443". Port 0 picks a
	// free port: New binds before anything uses the port (token audiences, URL).
	Listen string

	// DNSNames are the names (host names or IP addresses) in the CA's TLS serving
	// certificate; the first one is the host in bootstrap-token audiences. Default:
	// "localhost", "127.0.0.1", "::1", the listen host if it is specific, and
	// os.Hostname(). The host of URL() is appended when missing, so URL() always works.
	DNSNames []string

	// KMS is the PKCS#11 URI of the token holding the root, intermediate and
	// provisioner keys, for example
	// "pkcs11:module-path=/usr/lib/libyubihsm_pkcs11.so;token=agentmesh?pin-source=file:///etc/agentmesh/pin".
	// Missing keys are generated inside it on first start, as objects labelled
	// agentmesh-root, agentmesh-intermediate, agentmesh-provisioner and agentmesh-audit
	// (the audit key: checkpoints and cosignatures): give each CA its
	// own token. The URI is never logged with a pin-value. Default "": a SoftHSM2 token
	// created inside StateDir on first start, its random PIN in PINFile.
	KMS string

	// PINFile holds the user PIN of the SoftHSM2 token in StateDir (KMS ""): created
	// (0600, random) on first start when missing; a StateDir/hsm.pin of an earlier
	// version is moved there. It must be outside StateDir, so that a copy of the state
	// (backup, snapshot) never carries the key to the token's objects with them; a
	// systemd credential ($CREDENTIALS_DIRECTORY/hsm.pin) is the natural place.
	// Default "": hsm.DefaultPINFile(StateDir), StateDir's name with ".pin" appended
	// (/var/lib/agentmesh-ca.pin). Ignored when KMS is set.
	PINFile string

	// SVIDLifetime is the default and the maximum lifetime of issued X509-SVIDs.
	// Default 1h; at least 10s.
	SVIDLifetime time.Duration

	// TokenLifetime is how long a bootstrap token from Token is valid. Default 5m; at
	// most 24h.
	TokenLifetime time.Duration

	// DirectoryTTL is how long a mesh directory entry lives without a heartbeat;
	// proxies heartbeat every 10s by default, so three missed heartbeats drop an entry.
	// Default 30s; must be positive.
	DirectoryTTL time.Duration

	// MaxWatches is how many directory long-polls (GET /mesh/v1/directory) one client
	// identity may hold at once; one more is answered 429 at once, logged, and audited
	// (WatchRefusal) with the count of such refusals. Default 0: DefaultMaxWatches (4);
	// must be >= 0.
	MaxWatches int

	// RotationLiveWindow is how recent a proxy's last heartbeat must be for a rotation
	// of the trust anchors to count it live (`rotation status` marks the others; every
	// member that has not acknowledged blocks the next phase either way). Default 30s;
	// must be positive.
	RotationLiveWindow time.Duration

	// RotationRenewWindow is the window over which proxies spread the early renewals
	// a rotation of the trust anchors asks for, each after a random delay below it
	// (RotateRequest.RenewWindowMS overrides it per rotation). Default SVIDLifetime/4;
	// must be positive and below SVIDLifetime.
	RotationRenewWindow time.Duration

	// WitnessStaleAfter is how long a witnessed audit log may go without a checkpoint
	// before it counts as stale (metrics, status); set it to three times the proxies'
	// checkpoint interval. Default 30s; must be >= 0.
	WitnessStaleAfter time.Duration

	// AdminIDs are the SPIFFE IDs whose SVIDs may open the status page on the HTTPS
	// port (/status/); anyone else gets 403, audited (audit.StatusAccess). Default
	// none: nobody, on that port.
	AdminIDs []spiffeid.ID

	// StatusListen is a loopback TCP address serving the status page over plain HTTP
	// without authentication, for an operator on the CA's host (ssh -L). New refuses a
	// non-loopback address with ErrInvalidConfig. Default "": not served.
	StatusListen string

	// OpenAuditLog, when set, is called once by New with the CA's audit key (the ECDSA
	// P-256 key agentmesh-audit in the token, generated there on first start) to open
	// the CA's own audit log, which signs its checkpoints with it under
	// meshapi.CAAuditOrigin(TrustDomain): that log then receives the records Audit
	// would, and its checkpoints go to the proxies with every answer to theirs, to be
	// cosigned. The caller runs and closes the log. Default nil: Audit, and no
	// checkpoints of the CA's log.
	OpenAuditLog func(key crypto.Signer) (CheckpointLog, error)

	// Logger receives the CA's logs, including step-ca's per-request errors and
	// net/http's server errors. Default: discard.
	Logger *slog.Logger

	// Audit receives an audit.Revocation record for every revocation request, an
	// audit.Rotation for every fleet rotation, an audit.Registration for every
	// registration entry change and agent token request (mesh API), and an
	// audit.AddressClaim for every address claim learnt, changed or refused, and an
	// audit.CARotation for every event of a rotation of the trust anchors: done,
	// refused or failed, and an audit.StatusAccess for every refused request for the
	// status page. A failing Append is logged at Error; the action stands. Default nil: no
	// audit records.
	Audit interface{ Append(audit.Event) error }

	// Registerer receives the CA's metrics: agentmesh_ca_lineage_refused_total{reason}
	// (renewals, rekeys and enrolments the lineage rules refused),
	// agentmesh_ca_address_claims_*, and agentmesh_ca_rotation_* and
	// agentmesh_ca_anchor_not_after_seconds{role,fingerprint} (anchormetrics.go), and
	// agentmesh_ca_audit_* (witnessmetrics.go), and
	// agentmesh_ca_status_refused_total{reason} (statuspage.go). Default nil: not
	// registered.
	Registerer prometheus.Registerer
}

func (c Config) withDefaults() Config {
	if c.Listen == "" {
		c.Listen = defaultListen
	}
	if c.SVIDLifetime == 0 {
		c.SVIDLifetime = defaultSVIDLifetime
	}
	if c.TokenLifetime == 0 {
		c.TokenLifetime = defaultTokenLifetime
	}
	if c.DirectoryTTL == 0 {
		c.DirectoryTTL = defaultDirectoryTTL
	}
	if c.MaxWatches == 0 {
		c.MaxWatches = DefaultMaxWatches
	}
	if c.RotationLiveWindow == 0 {
		c.RotationLiveWindow = defaultLiveWindow
	}
	if c.RotationRenewWindow == 0 {
		c.RotationRenewWindow = c.SVIDLifetime / 4
	}
	if c.WitnessStaleAfter == 0 {
		c.WitnessStaleAfter = defaultWitnessStale
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.StateDir != "" {
		if abs, err := filepath.Abs(c.StateDir); err == nil {
			// Absolute, because the path goes into file:// URIs and softhsm2.conf.
			c.StateDir = abs
		}
	}
	c.DNSNames = slices.Clone(c.DNSNames)
	c.AdminIDs = slices.Clone(c.AdminIDs)
	return c
}

func (c Config) validate() error {
	switch {
	case c.StateDir == "":
		return fmt.Errorf("%w: StateDir is required", ErrInvalidConfig)
	case c.TrustDomain.IsZero():
		return fmt.Errorf("%w: TrustDomain is required", ErrInvalidConfig)
	case c.SVIDLifetime < minSVIDLifetime:
		return fmt.Errorf("%w: SVIDLifetime %v is below the minimum of %v", ErrInvalidConfig, c.SVIDLifetime, minSVIDLifetime)
	case c.TokenLifetime < 0 || c.TokenLifetime > maxTokenLifetime:
		return fmt.Errorf("%w: TokenLifetime %v is outside (0, %v]", ErrInvalidConfig, c.TokenLifetime, maxTokenLifetime)
	case c.DirectoryTTL < 0:
		return fmt.Errorf("%w: DirectoryTTL %v is negative", ErrInvalidConfig, c.DirectoryTTL)
	case c.MaxWatches < 0:
		return fmt.Errorf("%w: MaxWatches %d is negative", ErrInvalidConfig, c.MaxWatches)
	case c.WitnessStaleAfter < 0:
		return fmt.Errorf("%w: WitnessStaleAfter %v is negative", ErrInvalidConfig, c.WitnessStaleAfter)
	case c.RotationLiveWindow < 0:
		return fmt.Errorf("%w: RotationLiveWindow %v is negative", ErrInvalidConfig, c.RotationLiveWindow)
	case c.RotationRenewWindow < 0 || c.RotationRenewWindow >= c.SVIDLifetime:
		return fmt.Errorf("%w: RotationRenewWindow %v is outside (0, SVIDLifetime %v)", ErrInvalidConfig,
			c.RotationRenewWindow, c.SVIDLifetime)
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return fmt.Errorf("%w: Listen %q: %w", ErrInvalidConfig, c.Listen, err)
	}
	// Before New creates anything: a page meant for loopback never serves elsewhere.
	if c.StatusListen != "" {
		if err := checkLoopback(c.StatusListen); err != nil {
			return err
		}
	}
	for _, id := range c.AdminIDs {
		if !id.MemberOf(c.TrustDomain) {
			return fmt.Errorf("%w: AdminIDs: %s is not in trust domain %s", ErrInvalidConfig, id, c.TrustDomain.Name())
		}
	}
	return nil
}

// backdate is how far before "now" an SVID's NotBefore is set, to absorb clock skew
// between the CA and its peers. step-ca's default of 1m would make a 1-minute SVID valid
// for 2 minutes, so it scales with the lifetime: min(1m, lifetime/10).
//
// It is whole seconds: certificate times are encoded to the second, and a fractional
// backdate makes step-ca see a requested duration up to a second over its maximum.
func backdate(lifetime time.Duration) time.Duration {
	return max(time.Second, min(time.Minute, lifetime/10).Truncate(time.Second))
}
