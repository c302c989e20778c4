package ca

import (
	"bufio"
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/kms/apiv1"

	"github.com/agentmesh/agentmesh/ca/authority"
	"github.com/agentmesh/agentmesh/hsm"
	"github.com/agentmesh/agentmesh/internal/softhsmtest"
)

// p11Object is a key object as pkcs11-tool lists it.
type p11Object struct {
	class  string // "Private Key Object; EC", ...
	label  string
	access string
}

// listTokenObjects runs pkcs11-tool, in its own process, against the CA's SoftHSM token.
func listTokenObjects(t *testing.T, stateDir string) []p11Object {
	t.Helper()
	tool := softhsmtest.RequireTool(t, "pkcs11-tool")
	pin, err := os.ReadFile(hsm.DefaultPINFile(stateDir))
	if err != nil {
		t.Fatal(err)
	}
	// The PIN on a command line is acceptable in a test only.
	cmd := exec.CommandContext(t.Context(), tool, "--module", hsm.SoftHSMModule, "--token-label", authority.TokenLabel,
		"--login", "--pin", strings.TrimSpace(string(pin)), "--list-objects")
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+filepath.Join(stateDir, fileSoftHSMConf))
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("pkcs11-tool: %v\n%s", err, out)
	}
	var objs []p11Object
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, " ") && strings.Contains(line, "Object;") {
			objs = append(objs, p11Object{class: strings.TrimSpace(line)})
			continue
		}
		if len(objs) == 0 {
			continue
		}
		k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			continue
		}
		switch k {
		case "label":
			objs[len(objs)-1].label = strings.TrimSpace(v)
		case "Access":
			objs[len(objs)-1].access = strings.TrimSpace(v)
		}
	}
	return objs
}

// The HSM path is really taken: the private keys are objects in the token, sensitive and
// never extractable, and the keys the token holds are the ones in the certificates.
func TestKeysLiveInTheToken(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	svid := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/workload/hsm"))
	inter := svid.Certificates[1]
	if !inter.Equal(ca.auth.Intermediate()) {
		t.Fatal("SVID not issued by the CA's intermediate")
	}

	objs := listTokenObjects(t, cfg.StateDir)
	for _, label := range []string{"agentmesh-root", "agentmesh-intermediate", "agentmesh-provisioner", "agentmesh-audit"} {
		t.Run(label, func(t *testing.T) {
			var priv *p11Object
			for i := range objs {
				if objs[i].label == label && strings.HasPrefix(objs[i].class, "Private Key Object") {
					priv = &objs[i]
				}
			}
			if priv == nil {
				t.Fatalf("no private key %q in the token; objects: %+v", label, objs)
			}
			for _, want := range []string{"sensitive", "always sensitive", "never extractable", "local"} {
				if !strings.Contains(priv.access, want) {
					t.Errorf("private key %q access %q lacks %q", label, priv.access, want)
				}
			}
		})
	}

	// Through PKCS#11 in this process (a second KMS session on the same token, reached
	// as hsm.SoftHSM names it for the running CA): the token's keys are the
	// certificates' keys.
	uri, release, err := hsm.SoftHSM(cfg.StateDir, authority.TokenLabel, cfg.PINFile)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	km, err := hsm.OpenKMS(context.Background(), uri)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := km.Close(); err != nil {
			t.Errorf("close KMS: %v", err)
		}
	}()
	for _, tc := range []struct {
		name string
		uri  string
		cert *x509.Certificate
	}{
		{"root", authority.KeyURIRoot, ca.Roots()[0]},
		{"intermediate", authority.KeyURIIntermediate, inter},
	} {
		pub, err := km.GetPublicKey(&apiv1.GetPublicKeyRequest{Name: tc.uri})
		if err != nil {
			t.Fatalf("GetPublicKey %s: %v", tc.name, err)
		}
		if k, ok := pub.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(tc.cert.PublicKey) {
			t.Errorf("%s key in the token does not match the %s certificate", tc.name, tc.name)
		}
	}
	// The audit key, which signs the CA's checkpoints and cosigns the proxies', is the
	// token's agentmesh-audit, no TLS or issuing key.
	auditPub, err := km.GetPublicKey(&apiv1.GetPublicKeyRequest{Name: authority.KeyURIAudit})
	if err != nil {
		t.Fatalf("GetPublicKey audit: %v", err)
	}
	if !auditPub.(interface{ Equal(crypto.PublicKey) bool }).Equal(ca.auth.AuditSigner().Public()) ||
		auditPub.(interface{ Equal(crypto.PublicKey) bool }).Equal(inter.PublicKey) {
		t.Error("the audit key is not the token's agentmesh-audit, or is the intermediate's")
	}
	if pub, err := km.GetPublicKey(&apiv1.GetPublicKeyRequest{Name: authority.KeyURIRoot}); err != nil ||
		pub.(interface{ Equal(crypto.PublicKey) bool }).Equal(inter.PublicKey) {
		t.Error("the comparison above cannot tell keys apart")
	}
}

// Issuance needs the token: with the token's directory gone while the CA runs, tokens
// cannot be signed and a token issued before cannot enrol. The failure is not permanent
// (a retry can succeed once the HSM is back), unlike a refusal.
func TestIssuanceFailsWithoutTheToken(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	id := spiffeid.RequireFromPath(testTD, "/workload/hsm-down")
	svid := enroll(t, ca, id)
	tok, err := ca.Token(id)
	if err != nil {
		t.Fatal(err)
	}

	tokens := filepath.Join(cfg.StateDir, dirTokens)
	ents, err := os.ReadDir(tokens)
	if err != nil || len(ents) != 1 {
		t.Fatalf("token directory: %v %v", ents, err)
	}
	dir := filepath.Join(tokens, ents[0].Name())
	if err := os.Rename(dir, dir+".unplugged"); err != nil {
		t.Fatal(err)
	}

	client := newClient(t, ca, fixedToken(tok))
	_, err = client.Enroll(context.Background(), id, newKey(t))
	if err == nil || permanent(err) {
		t.Errorf("Enroll without the token: %v, want a non-permanent error", err)
	} else {
		t.Logf("Enroll: %v", err)
	}
	if _, err := client.Renew(context.Background(), svid, newKey(t)); err == nil || permanent(err) {
		t.Errorf("Renew without the token: %v, want a non-permanent error", err)
	}
	if _, err := ca.Token(id); !errors.Is(err, ErrHSM) {
		t.Errorf("Token without the token: %v, want ErrHSM", err)
	}
}

// A wrong PIN stops New with a clear HSM error; the right one starts the same CA. The PIN
// is kept outside the state directory, and a state directory of an earlier version, with
// its PIN inside, has it moved out on start.
func TestWrongPIN(t *testing.T) {
	cfg, _ := testConfig(t)
	requireSoftHSM(t)
	srv, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	root := srv.Roots()[0]
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	pinPath := hsm.DefaultPINFile(cfg.StateDir)
	if _, err := os.Stat(filepath.Join(cfg.StateDir, filePIN)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a PIN file in the state directory: %v", err)
	}
	pin, err := os.ReadFile(pinPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(pinPath, []byte("0000wrong"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = New(context.Background(), cfg)
	if !errors.Is(err, ErrHSM) {
		t.Fatalf("New with a wrong PIN: %v, want ErrHSM", err)
	}
	t.Logf("New with a wrong PIN: %v", err)

	if err := os.WriteFile(pinPath, pin, 0o600); err != nil {
		t.Fatal(err)
	}
	// The layout of an earlier version: the PIN in the state directory.
	if err := os.Rename(pinPath, filepath.Join(cfg.StateDir, filePIN)); err != nil {
		t.Fatal(err)
	}
	srv, err = New(context.Background(), cfg)
	if err != nil {
		t.Fatalf("New with the PIN in the state directory: %v", err)
	}
	defer func() {
		if err := srv.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	}()
	if !srv.Roots()[0].Equal(root) {
		t.Fatal("the root changed")
	}
	if moved, err := os.ReadFile(pinPath); err != nil || string(moved) != string(pin) {
		t.Errorf("PIN after the move %q, %v; want the old one at %s", moved, err, pinPath)
	}
	if _, err := os.Stat(filepath.Join(cfg.StateDir, filePIN)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the PIN is still in the state directory: %v", err)
	}
}

func TestKMSUnavailable(t *testing.T) {
	requireSoftHSM(t)
	for _, tc := range []struct {
		name string
		kms  string
	}{
		{"missing module", "pkcs11:module-path=/nonexistent/libpkcs11.so;token=agentmesh?pin-value=1234"},
		{"missing token", "pkcs11:module-path=" + hsm.SoftHSMModule + ";token=no-such-token?pin-value=1234"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, logs := testConfig(t)
			cfg.KMS = tc.kms
			_, err := New(context.Background(), cfg)
			if !errors.Is(err, ErrHSM) {
				t.Fatalf("New: %v, want ErrHSM", err)
			}
			if strings.Contains(err.Error(), "1234") || strings.Contains(logs.String(), "1234") {
				t.Errorf("the PIN leaked: %v", err)
			}
		})
	}
}
