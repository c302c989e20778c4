package testca

import (
	"crypto/tls"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ErrNoSVID is returned by Credentials.TLSCertificate when no SVID is set.
var ErrNoSVID = errors.New("testca: no svid")

// TLSCertificate converts an SVID into a tls.Certificate with Leaf set.
func TLSCertificate(s *x509svid.SVID) *tls.Certificate {
	chain := make([][]byte, 0, len(s.Certificates))
	for _, c := range s.Certificates {
		chain = append(chain, c.Raw)
	}
	return &tls.Certificate{
		Certificate: chain,
		PrivateKey:  s.PrivateKey,
		Leaf:        s.Certificates[0],
	}
}

// Credentials holds a hot-swappable SVID and a CA's bundle. It has the method
// set of proxy.Credentials (TLSCertificate plus x509bundle.Source). It returns
// whatever SVID was Set, expired or malformed ones included, so tests can make
// a real proxy present a bad certificate. Safe for concurrent use.
type Credentials struct {
	cert   atomic.Pointer[tls.Certificate]
	bundle *x509bundle.Bundle
}

// NewCredentials returns Credentials trusting ca's root and presenting svid
// (nil: no SVID until Set).
func NewCredentials(ca *CA, svid *x509svid.SVID) *Credentials {
	c := &Credentials{bundle: ca.Bundle()}
	c.Set(svid)
	return c
}

// Set replaces the SVID; nil removes it. Handshakes that start after Set
// returns present the new one.
func (c *Credentials) Set(svid *x509svid.SVID) {
	if svid == nil {
		c.cert.Store(nil)
		return
	}
	c.cert.Store(TLSCertificate(svid))
}

// TLSCertificate returns the current SVID, or ErrNoSVID.
func (c *Credentials) TLSCertificate() (*tls.Certificate, error) {
	cert := c.cert.Load()
	if cert == nil {
		return nil, ErrNoSVID
	}
	return cert, nil
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (c *Credentials) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if td != c.bundle.TrustDomain() {
		return nil, fmt.Errorf("testca: no bundle for trust domain %q", td)
	}
	return c.bundle, nil
}
