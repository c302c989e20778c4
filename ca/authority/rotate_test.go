package authority

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/smallstep/certificates/authority/provisioner"
	stepdb "github.com/smallstep/certificates/db"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"go.step.sm/crypto/kms/apiv1"

	"github.com/agentmesh/agentmesh/hsm"
	"github.com/agentmesh/agentmesh/meshapi"
)

// rotating is an authority on a token of its own in the shared SoftHSM directory:
// rotations delete keys, which other tests' state directories (sharing the generation
// 1 key labels of the shared token) still use. It is closed when the test ends.
type rotating struct {
	*Authority
	cfg Config
}

func openRotating(t *testing.T, label string) *rotating {
	t.Helper()
	dir, _ := token.Token(t)
	uri, release, err := hsm.SoftHSM(dir, label, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)
	r := &rotating{cfg: Config{TrustDomain: testTD, StateDir: t.TempDir(), KMS: uri, SVIDLifetime: time.Hour,
		Backdate: time.Minute, TokenLifetime: time.Minute, Logger: slog.New(slog.DiscardHandler)}}
	r.open(t)
	t.Cleanup(func() {
		if r.Authority != nil {
			_ = r.Close(nil)
		}
	})
	return r
}

func (r *rotating) open(t *testing.T) {
	t.Helper()
	var err error
	if r.Authority, err = Open(t.Context(), r.cfg); err != nil {
		t.Fatal(err)
	}
}

// restart closes the authority and opens its state directory again, as a CA restart.
func (r *rotating) restart(t *testing.T) {
	t.Helper()
	if err := r.Close(nil); err != nil {
		t.Fatal(err)
	}
	r.open(t)
}

// hasKey reports whether the token holds the key uri.
func hasKey(t *testing.T, a *Authority, uri string) bool {
	t.Helper()
	_, err := a.km.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: uri})
	return err == nil
}

// sameGeneration fails t unless got is want.
func sameGeneration(t *testing.T, what string, got, want Generation) {
	t.Helper()
	if got.N != want.N || !got.Root.Equal(want.Root) || !got.Intermediate.Equal(want.Intermediate) ||
		got.RootKey != want.RootKey || got.IntermediateKey != want.IntermediateKey || len(got.Cross) != len(want.Cross) {
		t.Fatalf("%s: generation %d (root key %s, intermediate key %s), want %d (%s, %s)",
			what, got.N, got.RootKey, got.IntermediateKey, want.N, want.RootKey, want.IntermediateKey)
	}
}

// verifyProbe verifies a's probe chain of g with the roots.
func verifyProbe(t *testing.T, a *Authority, g Generation, roots ...*x509.Certificate) error {
	t.Helper()
	chain := probeChain(t, a, g)
	id, _, err := x509svid.Verify(chain, x509bundle.FromX509Authorities(testTD, roots))
	if err == nil && id.Path() != ProbePath {
		t.Fatalf("probe ID %s", id)
	}
	return err
}

// probeChain is a's probe of g, parsed.
func probeChain(t *testing.T, a *Authority, g Generation) []*x509.Certificate {
	t.Helper()
	p, err := a.Probe(g)
	if err != nil {
		t.Fatal(err)
	}
	var chain []*x509.Certificate
	for b, rest := pem.Decode([]byte(p)); b != nil; b, rest = pem.Decode(rest) {
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, c)
	}
	if len(chain) != 2 || !chain[1].Equal(g.Intermediate) {
		t.Fatalf("probe chain of %d certificates, want leaf and generation %d's intermediate", len(chain), g.N)
	}
	return chain
}

// An intermediate rotation keeps the root and its key, resumes after every restart,
// switches issuance (and the serving certificate) at Activate and deletes only the old
// intermediate key at DestroyPrevious.
func TestRotateIntermediate(t *testing.T) {
	a := openRotating(t, "rot-intermediate")
	startServing(t, a.Authority)
	g1 := a.Active()
	g2, err := a.Prepare(meshapi.RotateIntermediate)
	if err != nil {
		t.Fatal(err)
	}
	if g2.N != 2 || !g2.Root.Equal(g1.Root) || g2.RootKey != g1.RootKey || g2.IntermediateKey == g1.IntermediateKey || g2.Cross != nil {
		t.Fatalf("prepared generation %d, root kept %v, keys %s %s", g2.N, g2.Root.Equal(g1.Root), g2.RootKey, g2.IntermediateKey)
	}
	if err := g2.Intermediate.CheckSignatureFrom(g1.Root); err != nil {
		t.Fatal(err)
	}
	if err := verifyProbe(t, a.Authority, g2, g1.Root); err != nil {
		t.Fatalf("probe of the new intermediate: %v", err)
	}
	again, err := a.Prepare(meshapi.RotateIntermediate)
	if err != nil {
		t.Fatal(err)
	}
	sameGeneration(t, "second Prepare", again, g2)
	if _, err := a.Prepare(meshapi.RotateRoot); !errors.Is(err, ErrGenerationState) {
		t.Fatalf("Prepare of another kind: %v", err)
	}
	sameGeneration(t, "active before Activate", a.Active(), g1)
	if servingIssuer(t, a.Authority) != g1.Intermediate.Subject.CommonName {
		t.Fatalf("serving certificate issued by %s before Activate", servingIssuer(t, a.Authority))
	}
	oldSVID := issueSVID(t, a.Authority)
	if oldSVID[0].CheckSignatureFrom(g1.Intermediate) != nil {
		t.Fatal("SVID issued before Activate is not from generation 1")
	}

	a.restart(t)
	next, ok := a.Next()
	if !ok {
		t.Fatal("prepared generation lost on restart")
	}
	sameGeneration(t, "next after restart", next, g2)
	startServing(t, a.Authority)
	if err := a.Activate(); err != nil {
		t.Fatal(err)
	}
	sameGeneration(t, "active", a.Active(), g2)
	if prev, ok := a.Previous(); !ok || prev.N != 1 {
		t.Fatalf("previous %d %v", prev.N, ok)
	}
	if servingIssuer(t, a.Authority) != g2.Intermediate.Subject.CommonName {
		t.Fatalf("serving certificate issued by %s after Activate", servingIssuer(t, a.Authority))
	}
	if chain := issueSVID(t, a.Authority); len(chain) != 2 || !chain[1].Equal(g2.Intermediate) || chain[0].CheckSignatureFrom(g2.Intermediate) != nil {
		t.Fatalf("SVID issued after Activate is not from generation 2 (chain of %d)", len(chain))
	}
	if err := a.Activate(); err != nil {
		t.Fatalf("second Activate: %v", err)
	}
	checkFiles(t, a.cfg.StateDir, g2)

	a.restart(t)
	sameGeneration(t, "active after restart", a.Active(), g2)
	if err := a.VerifyClientChain(oldSVID, time.Now()); err != nil {
		t.Fatalf("an SVID of the previous generation refused before DestroyPrevious: %v", err)
	}
	if err := a.DestroyPrevious(); err != nil {
		t.Fatal(err)
	}
	// The old intermediate is still valid under the kept root, but no longer the CA's.
	if err := a.VerifyClientChain(oldSVID, time.Now()); err == nil {
		t.Fatal("an SVID of the destroyed generation, sent with its intermediate, still verifies")
	}
	if _, ok := a.Previous(); ok || hasKey(t, a.Authority, g1.IntermediateKey) || !hasKey(t, a.Authority, g1.RootKey) || !hasKey(t, a.Authority, g2.IntermediateKey) {
		t.Fatalf("after DestroyPrevious: previous held %v, old intermediate key %v, root key %v",
			ok, hasKey(t, a.Authority, g1.IntermediateKey), hasKey(t, a.Authority, g1.RootKey))
	}
	if _, err := os.Stat(genFile(a.cfg.StateDir, 1, genIntermediate)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("generation 1's files kept: %v", err)
	}
	if err := a.DestroyPrevious(); err != nil {
		t.Fatalf("second DestroyPrevious: %v", err)
	}
	a.restart(t)
	sameGeneration(t, "active after destroy and restart", a.Active(), g2)
}

// A root rotation makes a new root and intermediate, the roots cross-signed both ways;
// the probe verifies under the new root only; DestroyPrevious deletes both old keys.
func TestRotateRoot(t *testing.T) {
	a := openRotating(t, "rot-root")
	g1 := a.Active()
	g2, err := a.Prepare(meshapi.RotateRoot)
	if err != nil {
		t.Fatal(err)
	}
	if g2.Root.Equal(g1.Root) || g2.RootKey == g1.RootKey || g2.IntermediateKey == g1.IntermediateKey {
		t.Fatalf("root rotation kept the root or a key: %s %s", g2.RootKey, g2.IntermediateKey)
	}
	if err := g2.Intermediate.CheckSignatureFrom(g2.Root); err != nil {
		t.Fatal(err)
	}
	checkCross(t, g1, g2)
	if err := verifyProbe(t, a.Authority, g2, g2.Root); err != nil {
		t.Fatalf("probe under the new root: %v", err)
	}
	if err := verifyProbe(t, a.Authority, g2, g1.Root); err == nil {
		t.Fatal("probe of the new generation verifies under the old root only")
	}

	a.restart(t)
	next, _ := a.Next()
	sameGeneration(t, "next after restart", next, g2)
	checkCross(t, g1, next)
	if err := a.Activate(); err != nil {
		t.Fatal(err)
	}
	a.restart(t)
	sameGeneration(t, "active after restart", a.Active(), g2)
	checkFiles(t, a.cfg.StateDir, g2)
	if err := a.DestroyPrevious(); err != nil {
		t.Fatal(err)
	}
	if hasKey(t, a.Authority, g1.RootKey) || hasKey(t, a.Authority, g1.IntermediateKey) || !hasKey(t, a.Authority, g2.RootKey) {
		t.Fatalf("after DestroyPrevious: old root key %v, old intermediate key %v",
			hasKey(t, a.Authority, g1.RootKey), hasKey(t, a.Authority, g1.IntermediateKey))
	}
	a.restart(t)
	sameGeneration(t, "active after destroy and restart", a.Active(), g2)
}

// checkCross verifies next's cross certificates: the new root under the old root's key
// and the old root under the new root's key, each a chain to the other anchor.
func checkCross(t *testing.T, prev, next Generation) {
	t.Helper()
	if len(next.Cross) != 2 {
		t.Fatalf("%d cross certificates, want 2", len(next.Cross))
	}
	for i, c := range []struct{ cert, subject, anchor *x509.Certificate }{
		{next.Cross[0], next.Root, prev.Root},
		{next.Cross[1], prev.Root, next.Root},
	} {
		pub, ok := c.cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool })
		if !ok || !pub.Equal(c.subject.PublicKey) || string(c.cert.RawSubject) != string(c.subject.RawSubject) {
			t.Fatalf("cross certificate %d is not of %s", i, c.subject.Subject)
		}
		pool := x509.NewCertPool()
		pool.AddCert(c.anchor)
		if _, err := c.cert.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Fatalf("cross certificate %d does not chain to %s: %v", i, c.anchor.Subject, err)
		}
	}
}

// checkFiles checks that root.crt and intermediate.crt hold g's certificates.
func checkFiles(t *testing.T, dir string, g Generation) {
	t.Helper()
	root, err := readCertFile(filepath.Join(dir, fileRoot))
	if err != nil || !root.Equal(g.Root) {
		t.Fatalf("root.crt is not generation %d's: %v", g.N, err)
	}
	inter, err := readCertFile(filepath.Join(dir, fileIntermediate))
	if err != nil || !inter.Equal(g.Intermediate) {
		t.Fatalf("intermediate.crt is not generation %d's: %v", g.N, err)
	}
}

// startServing listens on a loopback port and starts step-ca on a database in the
// state directory.
func startServing(t *testing.T, a *Authority) {
	t.Helper()
	if err := a.Listen(t.Context(), "127.0.0.1:0", nil); err != nil {
		t.Fatal(err)
	}
	d, err := stepdb.New(&stepdb.Config{Type: "bbolt", DataSource: filepath.Join(a.cfg.StateDir, "db")})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(IssuePolicy{DB: d, Enforce: func(*x509.Certificate) error { return nil }}); err != nil {
		_ = d.Shutdown()
		t.Fatal(err)
	}
}

// servingIssuer names the intermediate that issued the serving certificate.
func servingIssuer(t *testing.T, a *Authority) string {
	t.Helper()
	return a.servingCert.Load().Leaf.Issuer.CommonName
}

// issueSVID has step-ca sign an SVID for /agent/a through the provisioner, as /sign
// does, and returns its chain.
func issueSVID(t *testing.T, a *Authority) []*x509.Certificate {
	t.Helper()
	id := spiffeid.RequireFromPath(testTD, "/agent/a")
	tok, _, err := a.Token(id)
	if err != nil {
		t.Fatal(err)
	}
	ctx := provisioner.NewContextWithMethod(t.Context(), provisioner.SignMethod)
	opts, err := a.Step().Authorize(ctx, tok)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := a.Step().SignWithContext(ctx, csr, provisioner.SignOptions{}, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return chain
}
