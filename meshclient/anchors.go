package meshclient

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
)

// Anchors are the trust anchors the mesh clients verify the CA with: its TLS serving
// certificate at every handshake, and the deny-list's signature. The proxy replaces
// them (Set) when its bundle in force changes: after a rotation of the CA's root, the
// CA serves a certificate under the new root, which the root file the proxy started
// with does not hold. Safe for concurrent use.
type Anchors struct {
	cur atomic.Pointer[anchorSet]
}

// anchorSet is one set of anchors and its pool; immutable once published.
type anchorSet struct {
	roots []*x509.Certificate
	pool  *x509.CertPool
}

// NewAnchors holds roots.
func NewAnchors(roots []*x509.Certificate) *Anchors {
	a := &Anchors{}
	a.Set(roots)
	return a
}

// Set makes roots the anchors from the next handshake and the next deny-list on.
func (a *Anchors) Set(roots []*x509.Certificate) {
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	a.cur.Store(&anchorSet{roots: slices.Clone(roots), pool: pool})
}

// Roots are the anchors held; the caller must not modify them.
func (a *Anchors) Roots() []*x509.Certificate { return a.cur.Load().roots }

// anchorsOf is a's anchors, or fixed roots when a is nil.
func anchorsOf(a *Anchors, roots []*x509.Certificate) *Anchors {
	if a != nil {
		return a
	}
	return NewAnchors(roots)
}

// tlsConfig is a client configuration that verifies the CA at host against the
// anchors held at each handshake.
func (a *Anchors) tlsConfig(host string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		// The standard verification would use a pool fixed when the configuration was
		// built: VerifyConnection verifies the chain and the name instead, against the
		// anchors held at this handshake.
		InsecureSkipVerify: true, //nolint:gosec,forbidigo // replaced by VerifyConnection: chain and host name
		VerifyConnection:   func(cs tls.ConnectionState) error { return a.verifyServer(cs, host) },
	}
}

// verifyServer does what the standard verification of a server does, against the
// anchors held now.
func (a *Anchors) verifyServer(cs tls.ConnectionState, host string) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("ca: server presented no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{DNSName: host, Roots: a.cur.Load().pool,
		Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	if err != nil {
		return fmt.Errorf("ca: verify server certificate: %w", err)
	}
	return nil
}
