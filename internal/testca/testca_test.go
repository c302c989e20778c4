package testca_test

import (
	"crypto/x509"
	"errors"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/internal/testca"
)

func TestIssueVerifies(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	other := testca.New(t)
	id := spiffeid.RequireFromString("spiffe://example.org/host/a")

	tests := []struct {
		name    string
		svid    *x509svid.SVID
		wantErr bool
		wantAs  any
	}{
		{name: "valid", svid: ca.SVID(t, id)},
		{name: "foreign_ca", svid: other.SVID(t, id), wantErr: true, wantAs: &x509.UnknownAuthorityError{}},
		{name: "expired", svid: ca.SVID(t, id, testca.WithNotBefore(time.Now().Add(-2*time.Hour)), testca.WithLifetime(time.Hour)), wantErr: true, wantAs: &x509.CertificateInvalidError{}},
		{name: "two_uri_sans", svid: ca.SVID(t, id, testca.WithExtraURIs(&url.URL{Scheme: "spiffe", Host: "example.org", Path: "/x"})), wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, _, err := x509svid.Verify(tc.svid.Certificates, ca.Bundle())
			if tc.wantErr {
				if err == nil {
					t.Fatal("Verify succeeded, want error")
				}
				if tc.wantAs != nil && !errors.As(err, tc.wantAs) {
					t.Fatalf("Verify error %v is not %T", err, tc.wantAs)
				}
				return
			}
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if got != id {
				t.Fatalf("Verify id = %s, want %s", got, id)
			}
		})
	}
}

func TestIssueShape(t *testing.T) {
	t.Parallel()
	td := spiffeid.RequireTrustDomainFromString("mesh.test")
	ca := testca.New(t, testca.WithTrustDomain(td))
	if ca.TrustDomain() != td {
		t.Fatalf("TrustDomain = %s", ca.TrustDomain())
	}
	id := spiffeid.RequireFromPath(td, "/agent/x")
	s := ca.SVID(t, id, testca.WithSerial(big.NewInt(42)), testca.WithLifetime(5*time.Minute))
	if len(s.Certificates) != 2 {
		t.Fatalf("chain length %d, want 2", len(s.Certificates))
	}
	leaf := s.Certificates[0]
	if leaf.SerialNumber.Int64() != 42 {
		t.Errorf("serial = %s", leaf.SerialNumber)
	}
	if got := leaf.NotAfter.Sub(leaf.NotBefore); got != 5*time.Minute {
		t.Errorf("lifetime = %s", got)
	}
	if leaf.KeyUsage != x509.KeyUsageDigitalSignature || len(leaf.ExtKeyUsage) != 2 || leaf.IsCA {
		t.Errorf("leaf usages: ku=%v eku=%v ca=%v", leaf.KeyUsage, leaf.ExtKeyUsage, leaf.IsCA)
	}
	// A well-formed SVID also passes go-spiffe's own parser.
	certDER, keyDER, err := s.MarshalRaw()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := x509svid.ParseRaw(certDER, keyDER); err != nil {
		t.Fatalf("ParseRaw: %v", err)
	}
}

func TestCredentialsSwap(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	id := spiffeid.RequireFromString("spiffe://example.org/host/a")
	creds := testca.NewCredentials(ca, nil)
	if _, err := creds.TLSCertificate(); !errors.Is(err, testca.ErrNoSVID) {
		t.Fatalf("TLSCertificate with no SVID: %v, want ErrNoSVID", err)
	}
	first, second := ca.SVID(t, id), ca.SVID(t, id)
	creds.Set(first)
	got, err := creds.TLSCertificate()
	if err != nil || got.Leaf != first.Certificates[0] {
		t.Fatalf("TLSCertificate = %v, %v; want first", got, err)
	}
	creds.Set(second)
	if got, _ := creds.TLSCertificate(); got.Leaf != second.Certificates[0] {
		t.Fatal("Set did not swap the certificate")
	}
	if b, err := creds.GetX509BundleForTrustDomain(ca.TrustDomain()); err != nil || !b.Equal(ca.Bundle()) {
		t.Fatalf("bundle = %v, %v", b, err)
	}
	if _, err := creds.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("other.test")); err == nil {
		t.Fatal("bundle for a foreign trust domain, want error")
	}
}
