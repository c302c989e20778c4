package ca

import (
	"context"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
)

// The root is self-signed for 10 years with the trust domain's URI SAN and critical name
// constraints permitting only URIs in the trust domain; the intermediate carries the same
// constraints, cannot sign CAs, and is what root.crt and intermediate.crt hold.
func TestCAHierarchy(t *testing.T) {
	cfg, _ := testConfig(t)
	requireSoftHSM(t)
	srv, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	root, err := readCertFile(filepath.Join(cfg.StateDir, fileRoot))
	if err != nil || !root.Equal(srv.Roots()[0]) {
		t.Fatalf("root.crt is not Roots()[0]: %v", err)
	}
	inter, err := readCertFile(filepath.Join(cfg.StateDir, fileIntermediate))
	if err != nil {
		t.Fatal(err)
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

func TestWriteFileAtomic(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	for _, content := range []string{"first", "second, longer"} {
		if err := writeFileAtomic(path, []byte(content), 0o640); err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(path)
		if err != nil || string(got) != content {
			t.Fatalf("content %q, %v; want %q", got, err, content)
		}
		if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o640 {
			t.Errorf("mode %v", fi.Mode().Perm())
		}
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("temporary files left: %v", ents)
	}
	if err := writeFileAtomic(filepath.Join(dir, "missing", "f"), []byte("x"), 0o600); err == nil {
		t.Error("write into a missing directory succeeded")
	}
}
