package testca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// caValidity is how long the root and the intermediate are valid. CA
// certificates start an hour in the past so leaves back-dated with
// WithNotBefore still chain to a CA that was valid when they were issued.
const caValidity = 24 * time.Hour

// CA is a root plus an intermediate that signs leaves. It is immutable after
// New and safe for concurrent use.
type CA struct {
	td       spiffeid.TrustDomain
	root     *x509.Certificate
	inter    *x509.Certificate
	interKey *ecdsa.PrivateKey
	rootKey  *ecdsa.PrivateKey
}

// Option configures New.
type Option func(*caConfig)

type caConfig struct {
	td spiffeid.TrustDomain
}

// WithTrustDomain sets the trust domain (default example.org).
func WithTrustDomain(td spiffeid.TrustDomain) Option {
	return func(c *caConfig) { c.td = td }
}

// New creates a root and an intermediate signed by it.
func New(tb testing.TB, opts ...Option) *CA {
	tb.Helper()
	cfg := caConfig{td: spiffeid.RequireTrustDomainFromString("example.org")}
	for _, o := range opts {
		o(&cfg)
	}
	now := time.Now()
	rootKey := newKey(tb)
	rootTmpl := caTemplate(tb, cfg.td, "test root", now)
	root := sign(tb, rootTmpl, rootTmpl, rootKey.Public(), rootKey)

	interKey := newKey(tb)
	interTmpl := caTemplate(tb, cfg.td, "test intermediate", now)
	interTmpl.MaxPathLenZero = true
	inter := sign(tb, interTmpl, root, interKey.Public(), rootKey)
	return &CA{td: cfg.td, root: root, inter: inter, interKey: interKey, rootKey: rootKey}
}

// TrustDomain returns the CA's trust domain.
func (c *CA) TrustDomain() spiffeid.TrustDomain { return c.td }

// Roots returns the root certificate (a new slice each call).
func (c *CA) Roots() []*x509.Certificate { return []*x509.Certificate{c.root} }

// Bundle returns a new X.509 bundle holding the root.
func (c *CA) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(c.td, c.Roots())
}

// IssueOption configures Issue and SVID.
type IssueOption func(*issueConfig)

type issueConfig struct {
	lifetime  time.Duration
	notBefore time.Time
	extraURIs []*url.URL
	serial    *big.Int
	eku       []x509.ExtKeyUsage // nil: serverAuth and clientAuth
	ku        x509.KeyUsage      // digitalSignature unless WithKeyUsage
}

// WithLifetime sets the leaf's lifetime (default 1h). With WithNotBefore in
// the past it produces an already expired certificate.
func WithLifetime(d time.Duration) IssueOption {
	return func(c *issueConfig) { c.lifetime = d }
}

// WithNotBefore sets the leaf's NotBefore (default now).
func WithNotBefore(t time.Time) IssueOption {
	return func(c *issueConfig) { c.notBefore = t }
}

// WithExtraURIs adds URI SANs after the SPIFFE ID, which makes the leaf an
// invalid SVID (an SVID has exactly one URI SAN).
func WithExtraURIs(uris ...*url.URL) IssueOption {
	return func(c *issueConfig) { c.extraURIs = append(c.extraURIs, uris...) }
}

// WithSerial sets the leaf's serial number (default random 128 bits).
func WithSerial(serial *big.Int) IssueOption {
	return func(c *issueConfig) { c.serial = new(big.Int).Set(serial) }
}

// Issue signs a leaf for id and pub and returns it followed by the
// intermediate. The leaf has one URI SAN (plus WithExtraURIs), the
// digitalSignature key usage and the serverAuth and clientAuth extended key
// usages.
func (c *CA) Issue(tb testing.TB, id spiffeid.ID, pub crypto.PublicKey, opts ...IssueOption) []*x509.Certificate {
	tb.Helper()
	return []*x509.Certificate{c.issueUnder(tb, c.inter, c.interKey, id, pub, opts...), c.inter}
}

// issueUnder signs a leaf for id and pub with parent's key.
func (c *CA) issueUnder(tb testing.TB, parent *x509.Certificate, parentKey crypto.Signer, id spiffeid.ID, pub crypto.PublicKey, opts ...IssueOption) *x509.Certificate {
	tb.Helper()
	cfg := issueConfig{lifetime: time.Hour, notBefore: time.Now(),
		eku: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		ku:  x509.KeyUsageDigitalSignature}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.serial == nil {
		cfg.serial = randomSerial(tb)
	}
	tmpl := &x509.Certificate{
		SerialNumber: cfg.serial,
		Subject:      pkix.Name{Organization: []string{"agentmesh test"}},
		NotBefore:    cfg.notBefore,
		NotAfter:     cfg.notBefore.Add(cfg.lifetime),
		KeyUsage:     cfg.ku,
		ExtKeyUsage:  cfg.eku,
		URIs:         append([]*url.URL{id.URL()}, cfg.extraURIs...),
	}
	return sign(tb, tmpl, parent, pub, parentKey)
}

// SVID generates a new P-256 key and issues an SVID for it. The result is
// built directly (not through x509svid.Parse) so that invalid leaves asked
// for with options, such as two URI SANs, can still be presented in tests.
func (c *CA) SVID(tb testing.TB, id spiffeid.ID, opts ...IssueOption) *x509svid.SVID {
	tb.Helper()
	key := newKey(tb)
	return &x509svid.SVID{
		ID:           id,
		Certificates: c.Issue(tb, id, key.Public(), opts...),
		PrivateKey:   key,
	}
}

// caTemplate is a CA certificate of td named name, valid from an hour before now
// for caValidity.
func caTemplate(tb testing.TB, td spiffeid.TrustDomain, name string, now time.Time) *x509.Certificate {
	tb.Helper()
	return &x509.Certificate{
		SerialNumber:          randomSerial(tb),
		Subject:               pkix.Name{Organization: []string{"agentmesh test"}, CommonName: name + " " + td.Name()},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{td.ID().URL()},
	}
}

func newKey(tb testing.TB) *ecdsa.PrivateKey {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatalf("testca: generate key: %v", err)
	}
	return key
}

func randomSerial(tb testing.TB) *big.Int {
	tb.Helper()
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		tb.Fatalf("testca: serial: %v", err)
	}
	return serial
}

func sign(tb testing.TB, tmpl, parent *x509.Certificate, pub crypto.PublicKey, signer crypto.Signer) *x509.Certificate {
	tb.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		tb.Fatalf("testca: create certificate: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatalf("testca: parse certificate: %v", err)
	}
	return cert
}
