package rotator

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"crypto/tls"
	"errors"
	"log/slog"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/policy"
)

// Config configures a Rotator.
type Config struct {
	// ID is the identity to hold. Required.
	ID spiffeid.ID

	// Issuer obtains certificates. Required.
	Issuer Issuer

	// Bundle holds the trust anchors of ID's trust domain; answers from the CA must chain
	// to it and peers are verified against it. Required.
	Bundle *x509bundle.Bundle

	// Policy sets renewal timing, overlap and retry bounds. Zero fields take the
	// defaults documented in policy.Rotation.
	Policy policy.Rotation

	// NewKey makes the key for each new certificate: every rotation gets a fresh key.
	// Default: an in-memory ECDSA P-256 key.
	NewKey func() (crypto.Signer, error)

	// Audit receives one record per rotation attempt. Nil means none.
	Audit Auditor

	// Registerer receives the rotator's metrics. Nil means they are not registered.
	Registerer prometheus.Registerer

	// Logger receives rotation events. Nil discards them.
	Logger *slog.Logger

	// Rand is the jitter source, used only by Run's goroutine. Default: seeded from
	// crypto/rand.
	Rand *rand.Rand
}

func (c Config) withDefaults() Config {
	c.Policy = c.Policy.WithDefaults()
	if c.NewKey == nil {
		c.NewKey = func() (crypto.Signer, error) { return ecdsa.GenerateKey(elliptic.P256(), crand.Reader) }
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Rand == nil {
		var seed [32]byte
		_, _ = crand.Read(seed[:]) // crypto/rand.Read never fails on supported platforms
		c.Rand = rand.New(rand.NewChaCha8(seed))
	}
	return c
}

// credential is one SVID with everything derived from it, built once per rotation.
type credential struct {
	svid         *x509svid.SVID
	cert         *tls.Certificate
	serial       string
	overlapUntil time.Time // zero while active
}

func newCredential(s *x509svid.SVID) *credential {
	chain := make([][]byte, len(s.Certificates))
	for i, c := range s.Certificates {
		chain[i] = c.Raw
	}
	return &credential{
		svid:   s,
		cert:   &tls.Certificate{Certificate: chain, PrivateKey: s.PrivateKey, Leaf: s.Certificates[0]},
		serial: s.Certificates[0].SerialNumber.String(),
	}
}

func (c *credential) notAfter() time.Time { return c.svid.Certificates[0].NotAfter }

// snapshot is the immutable state that readers load; a rotation publishes a new one.
type snapshot struct {
	current  *credential   // nil before enrolment
	overlap  []*credential // superseded SVIDs still in overlap, newest first
	bundle   *x509bundle.Bundle
	renewAt  time.Time
	lastErr  error // last failed attempt since the current SVID was obtained
	attempts int   // failed attempts since then
}

// Rotator holds one identity's credentials and keeps them fresh. Its read methods are
// safe for concurrent use and never block; Run must be called once.
type Rotator struct {
	cfg     Config
	state   atomic.Pointer[snapshot]
	metrics *metrics
}

// New validates cfg and returns a Rotator holding no SVID yet; Run obtains one.
func New(cfg Config) (*Rotator, error) {
	switch {
	case cfg.ID.IsZero():
		return nil, errors.New("rotator: config: ID is required")
	case cfg.Issuer == nil:
		return nil, errors.New("rotator: config: Issuer is required")
	case cfg.Bundle == nil || cfg.Bundle.Empty():
		return nil, errors.New("rotator: config: Bundle with at least one authority is required")
	case cfg.Bundle.TrustDomain() != cfg.ID.TrustDomain():
		return nil, errors.New("rotator: config: Bundle is not for the ID's trust domain")
	}
	if err := cfg.Policy.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	m, err := newMetrics(cfg.Registerer, cfg.ID)
	if err != nil {
		return nil, err
	}
	r := &Rotator{cfg: cfg, metrics: m}
	r.state.Store(&snapshot{bundle: cfg.Bundle})
	return r, nil
}

// ID returns the identity this Rotator holds.
func (r *Rotator) ID() spiffeid.ID { return r.cfg.ID }

// TLSCertificate returns the current SVID as a tls.Certificate for GetCertificate and
// GetClientCertificate. It returns ErrNoSVID or ErrExpired rather than an expired
// certificate: an expired identity is never presented.
func (r *Rotator) TLSCertificate() (*tls.Certificate, error) {
	c, err := r.valid(time.Now())
	if err != nil {
		return nil, err
	}
	return c.cert, nil
}

// GetX509SVID implements x509svid.Source with the same rules as TLSCertificate.
func (r *Rotator) GetX509SVID() (*x509svid.SVID, error) {
	c, err := r.valid(time.Now())
	if err != nil {
		return nil, err
	}
	return c.svid, nil
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (r *Rotator) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return r.state.Load().bundle.GetX509BundleForTrustDomain(td)
}

// Ready returns nil while the identity has a valid SVID to present.
func (r *Rotator) Ready() error {
	_, err := r.valid(time.Now())
	return err
}

func (r *Rotator) valid(now time.Time) (*credential, error) {
	c := r.state.Load().current
	switch {
	case c == nil:
		return nil, ErrNoSVID
	case expired(c.notAfter(), now):
		return nil, ErrExpired
	}
	return c, nil
}
