package proxy

import (
	"crypto/x509"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/testca"
)

// TestChainCache: a chain verified once is accepted from the cache only while it is
// valid in time and only against the same authorities; anything else is verified
// again, and refused where x509svid.Verify refuses it.
func TestChainCache(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	id := spiffeid.RequireFromString("spiffe://example.org/host/a")
	svid := ca.SVID(t, id, testca.WithLifetime(time.Hour))
	chain := svid.Certificates
	var c chainCache
	now := time.Now()
	for range 2 {
		if err := c.verify(chain, ca.Bundle(), now); err != nil {
			t.Fatalf("valid chain refused: %v", err)
		}
	}
	if len(c.chains) != 1 {
		t.Fatalf("%d cached chains, want 1", len(c.chains))
	}
	if err := c.verify(chain, ca.Bundle(), chain[0].NotAfter.Add(time.Second)); err == nil {
		t.Error("a cached chain was accepted after it expired")
	}
	if err := c.verify(chain, ca.Bundle(), chain[0].NotBefore.Add(-time.Second)); err == nil {
		t.Error("a cached chain was accepted before it was valid")
	}
	// Another CA of the trust domain replaces this one: the cached verdict is gone.
	other := testca.New(t)
	if err := c.verify(chain, other.Bundle(), now); err == nil {
		t.Error("a chain of a removed CA was accepted from the cache")
	}
	// A chain that differs in any certificate is a different key.
	forged := append([]*x509.Certificate{other.SVID(t, id).Certificates[0]}, chain[1:]...)
	if err := c.verify(forged, ca.Bundle(), now); err == nil {
		t.Error("a leaf of another CA was accepted with a cached intermediate")
	}
}
