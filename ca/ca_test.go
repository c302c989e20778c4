package ca

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/smallstep/certificates/authority/provisioner"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/hsm"
	"github.com/agentmesh/agentmesh/meshapi"
)

// checkSVID verifies chain as an X509-SVID of id against ca's roots and checks the
// profile the provisioner template promises.
func checkSVID(t *testing.T, ca *runningCA, chain []*x509.Certificate, id spiffeid.ID) {
	t.Helper()
	bundle := x509bundle.FromX509Authorities(testTD, ca.Roots())
	got, _, err := x509svid.Verify(chain, bundle)
	if err != nil {
		t.Fatalf("x509svid.Verify: %v", err)
	}
	if got != id {
		t.Fatalf("SVID ID = %v, want %v", got, id)
	}
	leaf := chain[0]
	switch {
	case len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String():
		t.Errorf("URI SANs = %v, want exactly [%v]", leaf.URIs, id)
	case len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0:
		t.Errorf("unexpected SANs: dns=%v ip=%v email=%v", leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
	case leaf.Subject.String() != "":
		t.Errorf("subject = %q, want empty", leaf.Subject)
	case leaf.IsCA:
		t.Error("leaf is a CA")
	case leaf.KeyUsage != x509.KeyUsageDigitalSignature:
		t.Errorf("key usage = %v, want digitalSignature only", leaf.KeyUsage)
	case len(leaf.ExtKeyUsage) != 2 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || leaf.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth:
		t.Errorf("ext key usage = %v, want serverAuth, clientAuth", leaf.ExtKeyUsage)
	}
	if err := leaf.CheckSignatureFrom(chain[1]); err != nil {
		t.Errorf("leaf not signed by the intermediate: %v", err)
	}
}

// checkLifetime checks that leaf, issued between before and after, lives for lifetime
// from issuance, back-dated by bd.
func checkLifetime(t *testing.T, leaf *x509.Certificate, lifetime, bd time.Duration, before, after time.Time) {
	t.Helper()
	if got := leaf.NotAfter.Sub(leaf.NotBefore); got != lifetime+bd {
		t.Errorf("validity = %v, want %v + backdate %v", got, lifetime, bd)
	}
	lo, hi := before.Add(lifetime).Truncate(time.Second), after.Add(lifetime+time.Second)
	if leaf.NotAfter.Before(lo) || leaf.NotAfter.After(hi) {
		t.Errorf("NotAfter = %v, want within [%v, %v]", leaf.NotAfter, lo, hi)
	}
}

func TestEnrollAndRenew(t *testing.T) {
	cfg, logs := testConfig(t)
	ca := startCA(t, cfg)
	id := spiffeid.RequireFromPath(testTD, "/workload/a")

	before := time.Now()
	tok, err := ca.Token(id)
	if err != nil {
		t.Fatalf("Token: %v", err)
	}
	key := newKey(t)
	client := newClient(t, ca, fixedToken(tok))
	chain, err := client.Enroll(context.Background(), id, key)
	if err != nil {
		t.Fatalf("Enroll: %v", err)
	}
	t.Logf("Token+Enroll (first request, includes step-ca start): %v", time.Since(before))
	checkIssued(t, ca, chain, id, key, cfg.SVIDLifetime, before)

	svid := &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
	newKey := newKey(t)
	before = time.Now()
	renewed, err := client.Renew(context.Background(), svid, newKey)
	if err != nil {
		t.Fatalf("Renew: %v", err)
	}
	t.Logf("Renew: %v", time.Since(before))
	checkIssued(t, ca, renewed, id, newKey, cfg.SVIDLifetime, before)
	if renewed[0].SerialNumber.Cmp(chain[0].SerialNumber) == 0 {
		t.Fatal("renewal reused the serial")
	}

	// Steady-state latencies, once step-ca is serving.
	const n = 5
	var tokEnroll, renew time.Duration
	for i := range n {
		id := spiffeid.RequireFromPath(testTD, "/workload/timing"+string(rune('a'+i)))
		start := time.Now()
		svid := enroll(t, ca, id)
		tokEnroll += time.Since(start)
		start = time.Now()
		if _, err := client.Renew(context.Background(), svid, newKey); err != nil {
			t.Fatalf("Renew: %v", err)
		}
		renew += time.Since(start)
	}
	t.Logf("mean Token+Enroll %v, mean Renew %v (n=%d)", tokEnroll/n, renew/n, n)

	// Neither the logs nor the database hold a token or the PIN; the state directory and
	// its secrets are private.
	if err := ca.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	pin, err := os.ReadFile(hsm.DefaultPINFile(cfg.StateDir))
	if err != nil {
		t.Fatal(err)
	}
	dbBytes, err := os.ReadFile(filepath.Join(cfg.StateDir, dirDB, fileDB))
	if err != nil {
		t.Fatal(err)
	}
	secrets := map[string]string{"token": tok, "token signature": tok[strings.LastIndex(tok, ".")+1:], "pin": string(pin)}
	for name, secret := range secrets {
		if strings.Contains(logs.String(), secret) {
			t.Errorf("the %s appears in the logs", name)
		}
		if strings.Contains(string(dbBytes), secret) {
			t.Errorf("the %s appears in the database", name)
		}
	}
	for name, want := range map[string]os.FileMode{"": 0o700, hsm.DefaultPINFile(cfg.StateDir): 0o600, fileRoot: 0o644, fileIntermediate: 0o644, fileSoftHSMConf: 0o600} {
		path := name
		if !filepath.IsAbs(path) {
			path = filepath.Join(cfg.StateDir, name)
		}
		fi, err := os.Stat(path)
		if err != nil {
			t.Errorf("stat %q: %v", name, err)
		} else if fi.Mode().Perm() != want {
			t.Errorf("%q mode %v, want %v", name, fi.Mode().Perm(), want)
		}
	}
}

func TestTokenIsSingleUse(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	id := spiffeid.RequireFromPath(testTD, "/workload/once")
	tok, err := ca.Token(id)
	if err != nil {
		t.Fatal(err)
	}
	client := newClient(t, ca, fixedToken(tok))
	if _, err := client.Enroll(context.Background(), id, newKey(t)); err != nil {
		t.Fatalf("first Enroll: %v", err)
	}
	_, err = client.Enroll(context.Background(), id, newKey(t))
	var re *meshapi.ResponseError
	if !errors.As(err, &re) || re.Status != http.StatusUnauthorized || !permanent(err) {
		t.Fatalf("second Enroll with the same token: %v, want a permanent 401", err)
	}
}

func TestTokenIsBoundToID(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	a := spiffeid.RequireFromPath(testTD, "/workload/a")
	b := spiffeid.RequireFromPath(testTD, "/workload/b")
	tok, err := ca.Token(a)
	if err != nil {
		t.Fatal(err)
	}
	_, err = newClient(t, ca, fixedToken(tok)).Enroll(context.Background(), b, newKey(t))
	if !permanent(err) {
		t.Fatalf("Enroll of %v with a token for %v: %v, want a permanent error", b, a, err)
	}
}

func TestTokenRefusesForeignIDs(t *testing.T) {
	cfg, _ := testConfig(t)
	requireSoftHSM(t)
	srv, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	for _, tc := range []struct {
		name string
		id   spiffeid.ID
	}{
		{"other trust domain", spiffeid.RequireFromPath(spiffeid.RequireTrustDomainFromString("evil.test"), "/agent/a")},
		{"trust domain itself", testTD.ID()},
		{"zero", spiffeid.ID{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := srv.Token(tc.id); !errors.Is(err, ErrInvalidID) {
				t.Fatalf("Token(%q) = %v, want ErrInvalidID", tc.id, err)
			}
		})
	}
}

func TestRestartReusesState(t *testing.T) {
	cfg, logs := testConfig(t)
	first := startCA(t, cfg)
	const created = "softhsm2 token created"
	if n := strings.Count(logs.String(), created); n != 1 {
		t.Errorf("first start logged %q %d times, want once", created, n)
	}
	id := spiffeid.RequireFromPath(testTD, "/workload/restart")
	used, err := first.Token(id)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := newClient(t, first, fixedToken(used)).Enroll(context.Background(), id, newKey(t)); err != nil {
		t.Fatal(err)
	}
	svid := enroll(t, first, id) // the newest certificate of the identity: the one that may renew
	unused, err := first.Token(id)
	if err != nil {
		t.Fatal(err)
	}
	root := first.Roots()[0]
	if err := first.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}

	start := time.Now()
	srv, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatalf("New on the same state: %v", err)
	}
	t.Logf("New (later start): %v", time.Since(start))
	_ = srv.Close()
	if n := strings.Count(logs.String(), created); n != 1 {
		t.Errorf("a later start logged %q again (%d in all): the token was reused", created, n)
	}
	second := startCA(t, cfg)
	if !second.Roots()[0].Equal(root) {
		t.Fatal("restart created a new root")
	}
	client := newClient(t, second, fixedToken(unused))
	if _, err := client.Renew(context.Background(), svid, newKey(t)); err != nil {
		t.Errorf("Renew of an SVID issued before the restart: %v", err)
	}
	if _, err := client.Enroll(context.Background(), id, newKey(t)); err != nil {
		t.Errorf("Enroll with a token issued before the restart: %v", err)
	}
	_, err = newClient(t, second, fixedToken(used)).Enroll(context.Background(), id, newKey(t))
	if !permanent(err) {
		t.Errorf("Enroll with a token used before the restart: %v, want a permanent error", err)
	}
	enroll(t, second, spiffeid.RequireFromPath(testTD, "/workload/after-restart"))
}

func TestTrustDomainMismatch(t *testing.T) {
	cfg, _ := testConfig(t)
	requireSoftHSM(t)
	srv, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	cfg.TrustDomain = spiffeid.RequireTrustDomainFromString("other.test")
	if _, err := New(context.Background(), cfg); !errors.Is(err, ErrTrustDomainMismatch) {
		t.Fatalf("New with another trust domain: %v, want ErrTrustDomainMismatch", err)
	} else {
		t.Logf("error: %v", err)
	}
}

func TestOneCAPerStateDir(t *testing.T) {
	cfg, _ := testConfig(t)
	requireSoftHSM(t)
	srv, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	if _, err := New(context.Background(), cfg); !errors.Is(err, ErrStateInUse) {
		t.Errorf("second New on the same state: %v, want ErrStateInUse", err)
	}
	other, _ := testConfig(t)
	if _, err := New(context.Background(), other); !errors.Is(err, ErrSoftHSMInUse) {
		t.Errorf("New with a second embedded SoftHSM in the process: %v, want ErrSoftHSMInUse", err)
	}
}

func TestRequestToken(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	fi, err := os.Stat(filepath.Join(cfg.StateDir, fileAdminSocket))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("admin socket mode %v, want 0600", fi.Mode().Perm())
	}
	id := spiffeid.RequireFromPath(testTD, "/workload/admin")
	tok, err := RequestToken(context.Background(), cfg.StateDir, id)
	if err != nil {
		t.Fatalf("RequestToken: %v", err)
	}
	chain, err := newClient(t, ca, fixedToken(tok)).Enroll(context.Background(), id, newKey(t))
	if err != nil {
		t.Fatalf("Enroll with the admin token: %v", err)
	}
	checkSVID(t, ca, chain, id)

	foreign := spiffeid.RequireFromPath(spiffeid.RequireTrustDomainFromString("evil.test"), "/x")
	_, err = RequestToken(context.Background(), cfg.StateDir, foreign)
	var re *meshapi.ResponseError
	if !errors.As(err, &re) || re.Status != http.StatusBadRequest {
		t.Errorf("RequestToken for another trust domain: %v, want a 400 meshapi.ResponseError", err)
	}
	if err := ca.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if _, err := os.Stat(filepath.Join(cfg.StateDir, fileAdminSocket)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("admin socket left behind after Run: %v", err)
	}
	if _, err := RequestToken(context.Background(), cfg.StateDir, id); err == nil {
		t.Error("RequestToken without a running CA succeeded")
	}
}

func TestRunOnce(t *testing.T) {
	cfg, _ := testConfig(t)
	requireSoftHSM(t)
	srv, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if err := srv.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := srv.Run(context.Background()); !errors.Is(err, ErrServerClosed) {
		t.Errorf("Run after Close: %v, want ErrServerClosed", err)
	}

	// Close released the state directory. A Run whose context is already done starts
	// and stops cleanly; it cannot be repeated.
	srv, err = New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := srv.Run(ctx); err != nil {
		t.Errorf("Run with a done context: %v", err)
	}
	if err := srv.Run(context.Background()); !errors.Is(err, ErrServerClosed) {
		t.Errorf("second Run: %v, want ErrServerClosed", err)
	}
	if err := srv.Close(); err != nil {
		t.Errorf("Close after Run: %v", err)
	}
}

func TestStepAPIRoutes(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	hc := httpsClient(t, ca, nil)
	for _, path := range []string{"/health", "/1.0/health", "/roots", "/1.0/roots", "/version", "/provisioners", "/crl", "/1.0/crl"} {
		// step-ca answers /roots with 201.
		if status, _ := do(t, hc, http.MethodGet, ca.URL()+path, nil); status != http.StatusOK && status != http.StatusCreated {
			t.Errorf("GET %s: %d", path, status)
		}
	}

	// Revoke an SVID over mTLS: renewal is refused afterwards and the CRL, signed by the
	// intermediate in the token, lists it at once (GenerateOnRevoke).
	id := spiffeid.RequireFromPath(testTD, "/workload/revoked")
	svid := enroll(t, ca, id)
	serial := svid.Certificates[0].SerialNumber
	status, body := do(t, httpsClient(t, ca, tlsCert(svid)), http.MethodPost, ca.URL()+"/1.0/revoke",
		map[string]any{"serial": serial.String(), "reasonCode": 1, "reason": "key compromise", "passive": true})
	if status != http.StatusOK {
		t.Fatalf("revoke: %d %s", status, body)
	}
	_, err := newClient(t, ca, nil).Renew(context.Background(), svid, newKey(t))
	if !permanent(err) {
		t.Errorf("Renew of a revoked SVID: %v, want a permanent error", err)
	}
	status, der := do(t, hc, http.MethodGet, ca.URL()+"/1.0/crl", nil)
	if status != http.StatusOK {
		t.Fatalf("GET /1.0/crl: %d", status)
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		t.Fatalf("parse CRL: %v", err)
	}
	if err := crl.CheckSignatureFrom(svid.Certificates[1]); err != nil {
		t.Errorf("CRL not signed by the intermediate: %v", err)
	}
	found := false
	for _, e := range crl.RevokedCertificateEntries {
		found = found || e.SerialNumber.Cmp(serial) == 0
	}
	if !found {
		t.Errorf("CRL does not list the revoked serial %v", serial)
	}
}

// A certificate that does not chain to the root must not authenticate a renewal, even
// one that copies step-ca's provisioner extension: the TLS layer only requests client
// certificates, and requireValidClientCert is what stands between it and step-ca.
func TestForgedClientCertificateCannotRenew(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	genuine := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/workload/real"))

	evil := spiffeid.RequireFromPath(testTD, "/workload/evil")
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:   big.NewInt(4242),
		Subject:        pkix.Name{},
		NotBefore:      time.Now().Add(-time.Minute),
		NotAfter:       time.Now().Add(time.Hour),
		URIs:           []*url.URL{evil.URL()},
		KeyUsage:       x509.KeyUsageDigitalSignature,
		ExtKeyUsage:    []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		AuthorityKeyId: genuine.Certificates[0].AuthorityKeyId,
	}
	for _, ext := range genuine.Certificates[0].Extensions {
		if ext.Id.Equal(provisioner.StepOIDProvisioner) {
			tmpl.ExtraExtensions = append(tmpl.ExtraExtensions, ext)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	forged, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	svid := &x509svid.SVID{ID: evil, Certificates: []*x509.Certificate{forged, genuine.Certificates[1]}, PrivateKey: key}
	_, err = newClient(t, ca, nil).Renew(context.Background(), svid, newKey(t))
	var re *meshapi.ResponseError
	if !errors.As(err, &re) || re.Status != http.StatusUnauthorized || !re.Permanent() {
		t.Fatalf("Renew with a forged certificate: %v, want a permanent 401", err)
	}
}

// An expired SVID is refused by the client-certificate check (so Renew gets a
// permanent 401 and the rotator re-enrols); checked at a time after NotAfter rather
// than by waiting.
func TestExpiredClientCertificateIsRefused(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	svid := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/workload/late"))
	leaf := svid.Certificates[0]
	if err := ca.auth.VerifyClientChain(svid.Certificates, leaf.NotAfter.Add(-time.Second)); err != nil {
		t.Fatalf("valid SVID refused: %v", err)
	}
	var ie x509.CertificateInvalidError
	if err := ca.auth.VerifyClientChain(svid.Certificates, leaf.NotAfter.Add(time.Second)); !errors.As(err, &ie) || ie.Reason != x509.Expired {
		t.Fatalf("expired SVID: %v, want an expiry error", err)
	}
}

// checkIssued checks that chain is a valid SVID for id and key with the configured
// lifetime, issued after before.
func checkIssued(t *testing.T, ca *runningCA, chain []*x509.Certificate, id spiffeid.ID, key crypto.Signer, lifetime time.Duration, before time.Time) {
	t.Helper()
	checkSVID(t, ca, chain, id)
	checkLifetime(t, chain[0], lifetime, backdate(lifetime), before, time.Now())
	if pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(chain[0].PublicKey) {
		t.Fatal("certificate is not for the key it was asked for")
	}
}
