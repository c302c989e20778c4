package authority

import (
	"crypto/x509"
	"path/filepath"
	"testing"
)

// The root is self-signed for 10 years with the trust domain's URI SAN and critical name
// constraints permitting only URIs in the trust domain; the intermediate carries the same
// constraints, cannot sign CAs, and is what root.crt and intermediate.crt hold.
func TestCAHierarchy(t *testing.T) {
	a, dir := openTest(t)
	root, err := readCertFile(filepath.Join(dir, fileRoot))
	if err != nil || !root.Equal(a.Root()) || !a.Created() {
		t.Fatalf("root.crt is not Root() (created %v): %v", a.Created(), err)
	}
	inter, err := readCertFile(filepath.Join(dir, fileIntermediate))
	if err != nil || !inter.Equal(a.Intermediate()) {
		t.Fatalf("intermediate.crt is not Intermediate(): %v", err)
	}
	if err := root.CheckSignatureFrom(root); err != nil {
		t.Errorf("root not self-signed: %v", err)
	}
	if err := inter.CheckSignatureFrom(root); err != nil {
		t.Errorf("intermediate not signed by the root: %v", err)
	}
	if v := root.NotAfter.Sub(root.NotBefore); v < rootValidity {
		t.Errorf("root validity %v, want at least %v", v, rootValidity)
	}
	if !inter.NotAfter.Equal(root.NotAfter) {
		t.Errorf("intermediate ends %v, root %v", inter.NotAfter, root.NotAfter)
	}
	for name, c := range map[string]*x509.Certificate{"root": root, "intermediate": inter} {
		switch {
		case !c.IsCA || !c.BasicConstraintsValid:
			t.Errorf("%s is not a CA", name)
		case len(c.URIs) != 1 || c.URIs[0].String() != testTD.IDString():
			t.Errorf("%s URI SANs %v, want [%s]", name, c.URIs, testTD.IDString())
		case len(c.PermittedURIDomains) != 1 || c.PermittedURIDomains[0] != testTD.Name() || !c.PermittedDNSDomainsCritical:
			t.Errorf("%s name constraints: URI %v critical %v", name, c.PermittedURIDomains, c.PermittedDNSDomainsCritical)
		case c.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign:
			t.Errorf("%s key usage %v", name, c.KeyUsage)
		}
	}
	if inter.MaxPathLen != 0 || !inter.MaxPathLenZero {
		t.Errorf("intermediate may sign CAs: MaxPathLen %d", inter.MaxPathLen)
	}
}
