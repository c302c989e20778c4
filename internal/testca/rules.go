package testca

import (
	"crypto/x509"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// WithExtKeyUsage sets the leaf's extended key usages (default serverAuth and
// clientAuth); none leaves the extension out.
func WithExtKeyUsage(usages ...x509.ExtKeyUsage) IssueOption {
	return func(c *issueConfig) { c.eku = usages }
}

// WithKeyUsage sets the leaf's key usage (default digitalSignature); 0 leaves the
// extension out.
func WithKeyUsage(ku x509.KeyUsage) IssueOption {
	return func(c *issueConfig) { c.ku = ku }
}

// LongID returns a valid SPIFFE ID of td of exactly n bytes (n must leave room for
// "spiffe://<td>/" and one path character).
func LongID(tb testing.TB, td spiffeid.TrustDomain, n int) spiffeid.ID {
	tb.Helper()
	prefix := td.IDString() + "/agent/"
	if n <= len(prefix) {
		tb.Fatalf("testca: LongID: %d bytes is too short for %s", n, prefix)
	}
	id, err := spiffeid.FromString(prefix + strings.Repeat("a", n-len(prefix)))
	if err != nil {
		tb.Fatalf("testca: LongID: %v", err)
	}
	return id
}

// DeepSVID issues an SVID for id whose chain runs through depth intermediates of
// their own under the root (root → i1 → … → i<depth> → leaf): a chain every
// signature of which is valid, only longer than the mesh issues. The SVID's
// certificates are the leaf and the intermediates, nearest first.
func (c *CA) DeepSVID(tb testing.TB, id spiffeid.ID, depth int, opts ...IssueOption) *x509svid.SVID {
	tb.Helper()
	if depth < 1 {
		tb.Fatalf("testca: DeepSVID: depth %d < 1", depth)
	}
	parent, parentKey := c.root, c.rootKey
	chain := make([]*x509.Certificate, 0, depth+1)
	now := time.Now()
	for i := range depth {
		key := newKey(tb)
		tmpl := caTemplate(tb, c.td, fmt.Sprintf("test intermediate %d", i+1), now)
		inter := sign(tb, tmpl, parent, key.Public(), parentKey)
		chain = append(chain, inter)
		parent, parentKey = inter, key
	}
	key := newKey(tb)
	leaf := c.issueUnder(tb, parent, parentKey, id, key.Public(), opts...)
	certs := []*x509.Certificate{leaf}
	for i := len(chain) - 1; i >= 0; i-- {
		certs = append(certs, chain[i])
	}
	return &x509svid.SVID{ID: id, Certificates: certs, PrivateKey: key}
}
