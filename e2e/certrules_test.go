package e2e

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/internal/testca"
)

// TestCertificateRules: a running proxy refuses, whatever CA it trusts signed them, a
// client leaf whose extended key usage is serverAuth only, a chain with five
// intermediates and a SPIFFE ID of 2,049 bytes, each audited with its reason and
// counted; adding the CA that signed them to the trust-bundle file, and removing it,
// are each a bundle audit record with the old and new anchor fingerprints.
func TestCertificateRules(t *testing.T) {
	requireE2E(t)
	authority := startCA(t, 10*time.Minute)
	// The proxy's bundle file starts as the CA's root; the test adds its own CA to it.
	meshRoot := readFile(t, authority.root)
	authority.root = filepath.Join(t.TempDir(), "bundle.pem")
	writeFile(t, authority.root, string(meshRoot))

	httpPort := serveHTTP(t, func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") })
	td := spiffeid.RequireTrustDomainFromString(trustDomain)
	idA := spiffeid.RequireFromString("spiffe://" + trustDomain + "/host/a")
	tooLong := testca.LongID(t, td, 2049)
	// The service allows every identity presented below: only the rules refuse them.
	b := startProxy(t, authority, "b", nil, []service{{port: httpPort, allow: []string{idA.String(), tooLong.String()}}}, fastRefusals)

	// Adding a CA to the bundle file is an audited change of trust anchors.
	other := testca.New(t, testca.WithTrustDomain(td))
	meshFP, otherFP := fingerprintPEM(t, meshRoot), fingerprint(other.Roots()[0])
	writeFile(t, authority.root, string(meshRoot)+string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: other.Roots()[0].Raw})))
	added := awaitRecord(t, b, map[string]string{"type": "bundle", "result": "applied", "added": "[" + otherFP + "]"}, time.Minute)
	if fmt.Sprint(added["old_anchors"]) != "["+meshFP+"]" || fmt.Sprint(added["new_anchors"]) != "["+meshFP+" "+otherFP+"]" ||
		added["version"] == "" || added["previous"] == "" || added["version"] == added["previous"] {
		t.Fatalf("bundle record %v: want anchors [%s] -> [%s %s] and two versions", added, meshFP, meshFP, otherFP)
	}

	// A valid SVID of the added CA gets through: the refusals below are the rules'.
	if err := present(b.tunnel, httpPort, other.SVID(t, idA)); err != nil {
		t.Fatalf("a valid SVID of the added CA: %v", err)
	}
	before := handshakeMetric(t, b, "inbound", "refused")
	cases := []struct {
		reason string
		svid   *x509svid.SVID
	}{
		{"wrong_key_usage", other.SVID(t, idA, testca.WithExtKeyUsage(x509.ExtKeyUsageServerAuth))},
		{"chain_too_long", other.DeepSVID(t, idA, 5)},
		{"spiffe_id_too_long", other.SVID(t, tooLong)},
	}
	for _, c := range cases {
		if err := present(b.tunnel, httpPort, c.svid); err == nil {
			t.Errorf("%s: the tunnel was served", c.reason)
		}
		// Refused before authentication: in the source's refusals record, with the
		// certificate it presented.
		awaitRefusal(t, b, c.reason, c.svid.Certificates[0].SerialNumber.String(), time.Minute)
	}
	if after := handshakeMetric(t, b, "inbound", "refused"); after < before+float64(len(cases)) {
		t.Errorf("refused inbound handshakes went %v -> %v, want +%d", before, after, len(cases))
	}

	// Removing it is audited too.
	writeFile(t, authority.root, string(meshRoot))
	awaitRecord(t, b, map[string]string{"type": "bundle", "result": "applied", "removed": "[" + otherFP + "]",
		"new_anchors": "[" + meshFP + "]"}, time.Minute)
}

// present opens a tunnel to the proxy at addr with svid, asks for port and makes one
// HTTP request through it.
func present(addr string, port int, svid *x509svid.SVID) error {
	r := &rogue{key: svid.PrivateKey, svid: svid, port: uint16(port)} //nolint:gosec // a listener's port
	return r.tunnelErr(addr, nil)
}

// handshakeMetric reads agentmesh_proxy_handshakes_total{direction,result} (summed over
// transports) from p's admin port.
func handshakeMetric(t *testing.T, p *meshProxy, direction, result string) float64 {
	t.Helper()
	return adminMetric(t, p.admin, "agentmesh_proxy_handshakes_total", `direction="`+direction+`"`, `result="`+result+`"`)
}

func fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}

// fingerprintPEM is the fingerprint of the one certificate in a PEM file's content.
func fingerprintPEM(t *testing.T, b []byte) string {
	t.Helper()
	block, _ := pem.Decode(b)
	if block == nil {
		t.Fatal("no PEM certificate")
	}
	sum := sha256.Sum256(block.Bytes)
	return hex.EncodeToString(sum[:])
}
