package rotator

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/testca"
)

func TestCheckAnswer(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	foreign := testca.New(t)
	id := spiffeid.RequireFromString("spiffe://example.org/host/a")
	other := spiffeid.RequireFromString("spiffe://example.org/host/b")
	key := mustKey(t)
	otherKey := mustKey(t)
	now := time.Now()

	tests := []struct {
		name  string
		certs []*x509.Certificate
		ok    bool
	}{
		{name: "valid answer", certs: ca.Issue(t, id, key.Public()), ok: true},
		{name: "empty chain", certs: nil},
		{name: "another key", certs: ca.Issue(t, id, otherKey.Public())},
		{name: "another SPIFFE ID", certs: ca.Issue(t, other, key.Public())},
		{name: "already expired", certs: ca.Issue(t, id, key.Public(), testca.WithNotBefore(now.Add(-2*time.Hour)), testca.WithLifetime(time.Hour))},
		{name: "chain outside the bundle", certs: foreign.Issue(t, id, key.Public())},
		{name: "two URI SANs", certs: ca.Issue(t, id, key.Public(), testca.WithExtraURIs(other.URL()))},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			svid, err := checkAnswer(id, key, tc.certs, ca.Bundle(), now)
			if tc.ok {
				if err != nil {
					t.Fatalf("checkAnswer: %v", err)
				}
				if svid.ID != id || svid.PrivateKey != key {
					t.Fatalf("svid = %v with another key", svid.ID)
				}
				return
			}
			if !errors.Is(err, ErrBadAnswer) {
				t.Fatalf("checkAnswer err = %v, want ErrBadAnswer", err)
			}
		})
	}
}

func mustKey(tb testing.TB) *ecdsa.PrivateKey {
	tb.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	return k
}
