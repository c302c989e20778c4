package authority

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/x509util"
)

// The provisioner template turns exactly one in-domain SPIFFE ID into an SVID profile
// and refuses anything else, whatever the token says.
func TestSVIDTemplate(t *testing.T) {
	t.Parallel()
	p := newProvisioner(nil, testTD, time.Minute)
	tmpl := p.Options.X509.Template
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		URIs: []*url.URL{spiffeid.RequireFromPath(testTD, "/agent/a").URL()},
	}, key)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		sans []string
		ok   bool
	}{
		{"one SPIFFE ID", []string{"spiffe://mesh.test/agent/a"}, true},
		{"two SPIFFE IDs", []string{"spiffe://mesh.test/agent/a", "spiffe://mesh.test/agent/b"}, false},
		{"DNS name", []string{"agent.mesh.test"}, false},
		{"IP address", []string{"10.0.0.1"}, false},
		{"other trust domain", []string{"spiffe://evil.test/agent/a"}, false},
		{"trust domain prefix trick", []string{"spiffe://mesh.test.evil/agent/a"}, false},
		{"trust domain itself", []string{"spiffe://mesh.test"}, false},
		{"no SAN", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			// Parsed per case: x509util modifies the request it is given.
			csr, err := x509.ParseCertificateRequest(csrDER)
			if err != nil {
				t.Fatal(err)
			}
			data := x509util.CreateTemplateData("sub", tc.sans)
			crt, err := x509util.NewCertificate(csr, x509util.WithTemplate(tmpl, data))
			if !tc.ok {
				if err == nil {
					t.Fatalf("template accepted %v", tc.sans)
				}
				t.Logf("refused: %v", err)
				return
			}
			if err != nil {
				t.Fatalf("template: %v", err)
			}
			c := crt.GetCertificate()
			if len(c.URIs) != 1 || c.URIs[0].String() != tc.sans[0] || len(c.DNSNames)+len(c.IPAddresses)+len(c.EmailAddresses) != 0 ||
				c.IsCA || c.KeyUsage != x509.KeyUsageDigitalSignature || c.Subject.String() != "" {
				t.Errorf("certificate profile: uris=%v dns=%v ca=%v ku=%v subject=%q", c.URIs, c.DNSNames, c.IsCA, c.KeyUsage, c.Subject)
			}
		})
	}
}
