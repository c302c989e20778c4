package rotator

import (
	"crypto"
	"crypto/x509"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// checkAnswer turns a chain returned by the CA into an SVID for id and key, or explains
// with ErrBadAnswer why this identity must not use it. A compromised or confused CA
// front-end must never make the proxy present someone else's identity or key.
func checkAnswer(id spiffeid.ID, key crypto.Signer, certs []*x509.Certificate, bundle x509bundle.Source, now time.Time) (*x509svid.SVID, error) {
	if len(certs) == 0 {
		return nil, fmt.Errorf("%w: empty chain", ErrBadAnswer)
	}
	leaf := certs[0]
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(leaf.PublicKey) {
		return nil, fmt.Errorf("%w: certificate is for another key", ErrBadAnswer)
	}
	got, _, err := x509svid.Verify(certs, bundle, x509svid.WithTime(now))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadAnswer, err)
	}
	if got != id {
		return nil, fmt.Errorf("%w: certificate is for %s, want %s", ErrBadAnswer, got, id)
	}
	return &x509svid.SVID{ID: id, Certificates: certs, PrivateKey: key}, nil
}
