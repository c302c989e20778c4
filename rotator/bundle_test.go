package rotator

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"slices"
	"sync"
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
)

// bundleRecords keeps the trust-bundle records a rotator appends.
type bundleRecords struct {
	mu   sync.Mutex
	list []*audit.TrustBundle
}

func (b *bundleRecords) Append(e audit.Event) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if tb, ok := e.(*audit.TrustBundle); ok {
		b.list = append(b.list, tb)
	}
	return nil
}

func (b *bundleRecords) all() []*audit.TrustBundle {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.list)
}

// TestSetBundleAudited: adding a CA, removing one and a refused bundle each leave one
// record with the old and new anchor fingerprints and versions; the same anchors
// again leave none.
func TestSetBundleAudited(t *testing.T) {
	t.Parallel()
	iss := newIssuer(t, 0)
	rec := &bundleRecords{}
	r, err := New(Config{ID: hostA, Issuer: iss, Bundle: iss.ca.Bundle(), Audit: rec})
	if err != nil {
		t.Fatal(err)
	}
	mesh := iss.ca.Roots()
	added := testca.New(t).Roots()
	both := x509bundle.FromX509Authorities(hostA.TrustDomain(), append(slices.Clone(mesh), added...))

	steps := []struct {
		name                  string
		set                   *x509bundle.Bundle
		result                audit.BundleResult
		old, new, plus, minus []*x509.Certificate
	}{
		{name: "ca_added", set: both, result: audit.BundleApplied, old: mesh, new: both.X509Authorities(), plus: added},
		{name: "same_anchors", set: x509bundle.FromX509Authorities(hostA.TrustDomain(), both.X509Authorities())},
		{name: "ca_removed", set: iss.ca.Bundle(), result: audit.BundleApplied, old: both.X509Authorities(), new: mesh, minus: added},
		{name: "empty_refused", set: x509bundle.New(hostA.TrustDomain()), result: audit.BundleRefused, old: mesh, new: mesh},
	}
	for _, s := range steps {
		before := len(rec.all())
		_ = r.SetBundle(s.set)
		got := rec.all()[before:]
		if s.result == "" {
			if len(got) != 0 {
				t.Fatalf("%s: %d records, want none", s.name, len(got))
			}
			continue
		}
		if len(got) != 1 {
			t.Fatalf("%s: %d records, want 1", s.name, len(got))
		}
		g := got[0]
		switch {
		case g.Result != s.result || g.SPIFFEID != hostA.String() || g.TrustDomain != hostA.TrustDomain().Name():
			t.Errorf("%s: record %+v, want result %s", s.name, g, s.result)
		case !slices.Equal(g.Old, fingerprints(s.old)) || !slices.Equal(g.New, fingerprints(s.new)):
			t.Errorf("%s: anchors %v -> %v, want %v -> %v", s.name, g.Old, g.New, fingerprints(s.old), fingerprints(s.new))
		case !slices.Equal(g.Added, fingerprints(s.plus)) || !slices.Equal(g.Removed, fingerprints(s.minus)):
			t.Errorf("%s: added %v removed %v, want %v and %v", s.name, g.Added, g.Removed, fingerprints(s.plus), fingerprints(s.minus))
		case g.Version != BundleVersion(s.new):
			t.Errorf("%s: version %s, want %s", s.name, g.Version, BundleVersion(s.new))
		case s.result == audit.BundleApplied && g.Previous != BundleVersion(s.old):
			t.Errorf("%s: previous %s, want %s", s.name, g.Previous, BundleVersion(s.old))
		}
	}
	if r.BundleVersion() != BundleVersion(mesh) {
		t.Errorf("BundleVersion %s, want %s", r.BundleVersion(), BundleVersion(mesh))
	}
}

// fingerprints computes the expected names independently of the rotator: the SHA-256
// of each DER certificate. nil for none.
func fingerprints(certs []*x509.Certificate) []string {
	var out []string
	for _, c := range certs {
		sum := sha256.Sum256(c.Raw)
		out = append(out, hex.EncodeToString(sum[:]))
	}
	return out
}
