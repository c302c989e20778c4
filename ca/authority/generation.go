package authority

import (
	"crypto"
	"crypto/x509"
	"fmt"
	"slices"

	"go.step.sm/crypto/kms/apiv1"

	"github.com/agentmesh/agentmesh/meshapi"
)

// Generation is one set of the CA's keys and certificates: a root and the intermediate
// under it, whose keys are in the token. Generation 1 is the hierarchy Open creates; a
// rotation prepares the next one. An intermediate rotation's generation keeps the root
// and its key; a root rotation's has a new root, cross-signed with the old one.
type Generation struct {
	// N numbers the generations of a state directory; it only increases.
	N int
	// Root and Intermediate are the generation's certificates. The caller may not
	// modify them.
	Root, Intermediate *x509.Certificate
	// RootKey and IntermediateKey are the PKCS#11 URIs of their keys in the token.
	RootKey, IntermediateKey string
	// Cross holds, for a root rotation's generation, the new root signed by the old
	// root's key and then the old root signed by the new root's key, so that a holder
	// of either root can verify the other; nil otherwise.
	Cross []*x509.Certificate
}

// Kind is what replaced the generation before it: a generation with the same root key
// as prev is an intermediate rotation's.
func (g Generation) Kind(prev Generation) meshapi.AnchorKind {
	if g.RootKey == prev.RootKey {
		return meshapi.RotateIntermediate
	}
	return meshapi.RotateRoot
}

// generation is a Generation with its signers in the token.
type generation struct {
	Generation
	rootSigner, intermediateSigner crypto.Signer
}

// pkiState is the authority's generations: the one it issues from (active), the one a
// rotation prepared (next), the one a rotation replaced and that is not destroyed yet
// (previous). It is immutable: every change stores a new one.
type pkiState struct {
	active, next, previous *generation
	// last is the highest generation number ever prepared, so that a discarded
	// generation's number (and key labels) are not reused.
	last int
	// deleting lists key URIs whose deletion from the token may not have completed.
	deleting []string
	// intermediates is every held generation's intermediate, for chain verification.
	intermediates *x509.CertPool
}

// held is the generations the state holds, active first.
func (s *pkiState) held() []*generation {
	gs := []*generation{s.active}
	for _, g := range []*generation{s.next, s.previous} {
		if g != nil {
			gs = append(gs, g)
		}
	}
	return gs
}

// with returns a copy of s in which change has been applied, its pool recomputed.
func (s *pkiState) with(change func(*pkiState)) *pkiState {
	c := *s
	c.deleting = slices.Clone(s.deleting)
	change(&c)
	c.intermediates = x509.NewCertPool()
	for _, g := range c.held() {
		c.intermediates.AddCert(g.Intermediate)
	}
	return &c
}

// roots is the distinct roots of the held generations, active first.
func (s *pkiState) roots() []*x509.Certificate {
	var roots []*x509.Certificate
	for _, g := range s.held() {
		if !slices.ContainsFunc(roots, g.Root.Equal) {
			roots = append(roots, g.Root)
		}
	}
	return roots
}

// find returns the held generation g names (same number and intermediate).
func (s *pkiState) find(g Generation) (*generation, bool) {
	for _, h := range s.held() {
		if h.N == g.N && g.Intermediate != nil && h.Intermediate.Equal(g.Intermediate) {
			return h, true
		}
	}
	return nil, false
}

// byNumber returns the held generation numbered n.
func (s *pkiState) byNumber(n int) (*generation, bool) {
	for _, g := range s.held() {
		if g.N == n {
			return g, true
		}
	}
	return nil, false
}

// keysOnlyOf returns the key URIs of g that none of the others uses.
func keysOnlyOf(g *generation, others ...*generation) []string {
	var keys []string
	for _, k := range []string{g.RootKey, g.IntermediateKey} {
		used := slices.ContainsFunc(others, func(o *generation) bool {
			return o != nil && (o.RootKey == k || o.IntermediateKey == k)
		})
		if !used && !slices.Contains(keys, k) {
			keys = append(keys, k)
		}
	}
	return keys
}

// RootKeyURI is the PKCS#11 URI of generation n's root key when a root rotation made
// it (generation 1's for n = 1): labels agentmesh-root-N with CKA_IDs of their own,
// distinct from generation 1's. An intermediate rotation's generation keeps the root
// key of the one before.
func RootKeyURI(n int) string {
	if n <= 1 {
		return keyURIRoot
	}
	return fmt.Sprintf("pkcs11:id=a901%04x;object=agentmesh-root-%d", n, n)
}

// IntermediateKeyURI is the PKCS#11 URI of generation n's intermediate key (label
// agentmesh-intermediate-N; generation 1's for n = 1).
func IntermediateKeyURI(n int) string {
	if n <= 1 {
		return keyURIIntermediate
	}
	return fmt.Sprintf("pkcs11:id=a902%04x;object=agentmesh-intermediate-%d", n, n)
}

// keyStore is what the generations need of the token: *pkcs11.PKCS11 satisfies it.
type keyStore interface {
	apiv1.KeyManager
	DeleteKey(uri string) error
}

// deleteKeys deletes the keys from the token; a key already gone is no error.
func deleteKeys(km keyStore, uris []string) error {
	for _, u := range uris {
		if err := km.DeleteKey(u); err != nil {
			return fmt.Errorf("%w: delete key %s: %w", ErrHSM, u, err)
		}
	}
	return nil
}
