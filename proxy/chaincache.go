package proxy

import (
	"crypto/sha256"
	"crypto/x509"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// maxVerifiedChains bounds the cache; past it the cache starts over (peers present a
// handful of chains each, so this is thousands of peers' worth).
const maxVerifiedChains = 4096

// chainCache remembers which certificate chains x509svid.Verify accepted against which
// bundle, so that a peer presenting the same chain again (every resumed session does,
// and so does every new connection until the peer rotates) costs a hash instead of the
// chain's signature checks. It caches only the signature math: validity in time is
// checked on every use against the chain's own bounds, and the deny-list, staleness and
// authorization checks run on every handshake regardless. Other authorities (a CA
// added or removed) empty it. Safe for concurrent use.
type chainCache struct {
	mu     sync.Mutex
	roots  []*x509.Certificate // the authorities the cached chains were verified against
	chains map[[sha256.Size]byte]validity
}

// validity is when every certificate of a verified chain is valid.
type validity struct{ notBefore, notAfter time.Time }

// verify is x509svid.Verify(chain, source) at now, through the cache.
func (c *chainCache) verify(chain []*x509.Certificate, source x509bundle.Source, now time.Time) error {
	id, err := x509svid.IDFromCert(chain[0])
	if err != nil {
		return err
	}
	bundle, err := source.GetX509BundleForTrustDomain(id.TrustDomain())
	if err != nil {
		return err
	}
	roots := bundle.X509Authorities()
	key := chainKey(chain)
	c.mu.Lock()
	if !slices.Equal(c.roots, roots) {
		c.roots, c.chains = roots, nil
	}
	v, ok := c.chains[key]
	c.mu.Unlock()
	if ok && !now.Before(v.notBefore) && !now.After(v.notAfter) {
		return nil
	}
	if _, _, err := x509svid.Verify(chain, source, x509svid.WithTime(now)); err != nil {
		return err
	}
	v = validity{notBefore: chain[0].NotBefore, notAfter: chain[0].NotAfter}
	for _, cert := range chain[1:] {
		v.notBefore = later(v.notBefore, cert.NotBefore)
		v.notAfter = earlier(v.notAfter, cert.NotAfter)
	}
	c.mu.Lock()
	if slices.Equal(c.roots, roots) {
		if c.chains == nil || len(c.chains) >= maxVerifiedChains {
			c.chains = make(map[[sha256.Size]byte]validity)
		}
		c.chains[key] = v
	}
	c.mu.Unlock()
	return nil
}

// chainKey is the SHA-256 of the chain's DER certificates, each length-prefixed so
// that no two chains share a key.
func chainKey(chain []*x509.Certificate) [sha256.Size]byte {
	h := sha256.New()
	var n [4]byte
	for _, c := range chain {
		l := len(c.Raw)
		n[0], n[1], n[2], n[3] = byte(l>>24), byte(l>>16), byte(l>>8), byte(l)
		h.Write(n[:])
		h.Write(c.Raw)
	}
	var k [sha256.Size]byte
	h.Sum(k[:0])
	return k
}

func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

func earlier(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}
