package hsm_test

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	kmsuri "go.step.sm/crypto/kms/uri"

	"github.com/agentmesh/agentmesh/hsm"
)

// tokenDirs counts SoftHSM's token directories (one per token) under dir.
func tokenDirs(tb testing.TB, dir string) int {
	tb.Helper()
	ents, err := os.ReadDir(filepath.Join(dir, "tokens"))
	if err != nil {
		tb.Fatal(err)
	}
	return len(ents)
}

// A new token in the shared directory, created while keys on another token are open
// (the module is initialised already and must stay so): files and modes as documented,
// a URI that names the PIN file and not the PIN, and a second call that changes
// nothing. Not parallel: it counts token directories.
func TestSoftHSM(t *testing.T) {
	dir, uri := softHSM(t)
	open := openKeys(t, uri, unique("softhsm-")+"-")
	busy, err := open.NewKey(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	n := tokenDirs(t, dir)

	label := unique("hsm-new token ")
	newURI, release, err := hsm.SoftHSM(dir, label, "")
	if err != nil {
		t.Fatalf("SoftHSM: %v", err)
	}
	defer release()
	if got := tokenDirs(t, dir); got != n+1 {
		t.Errorf("%d token directories, want %d", got, n+1)
	}

	for path, want := range map[string]os.FileMode{
		filepath.Join(dir, "softhsm2.conf"): 0o600, hsm.DefaultPINFile(dir): 0o600, filepath.Join(dir, "tokens"): 0o700 | os.ModeDir,
	} {
		name := filepath.Base(path)
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode() & (os.ModePerm | os.ModeDir); got != want {
			t.Errorf("%s mode %v, want %v", name, got, want)
		}
	}
	conf, err := os.ReadFile(filepath.Join(dir, "softhsm2.conf"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(conf), "directories.tokendir = "+filepath.Join(dir, "tokens")+"\n") {
		t.Errorf("configuration does not point into %s:\n%s", dir, conf)
	}
	if _, err := os.Stat(filepath.Join(dir, "hsm.pin")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a PIN file in the SoftHSM directory: %v", err)
	}
	pin, err := os.ReadFile(hsm.DefaultPINFile(dir))
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`^[0-9a-f]{32}$`).Match(pin) {
		t.Errorf("PIN file %q: want 32 hex digits", pin)
	}
	if strings.Contains(newURI, string(pin)) || strings.Contains(newURI, "pin-value") {
		t.Errorf("URI %s carries the PIN", newURI)
	}
	// The URI round-trips through the KMS's parser, whatever the directory's name
	// (the shared one has a space, a '+' and a ';').
	u, err := kmsuri.ParseWithScheme("pkcs11", newURI)
	if err != nil {
		t.Fatal(err)
	}
	if got := u.Get("token"); got != label {
		t.Errorf("token %q, want %q", got, label)
	}
	if got := u.Get("module-path"); got != hsm.SoftHSMModule {
		t.Errorf("module-path %q", got)
	}
	if got, err := u.Read("pin-source"); err != nil || string(got) != string(pin) {
		t.Errorf("pin-source reads %q, %v; want the PIN file", got, err)
	}

	// The token works with the PIN, and the other token's keys still sign: the module
	// was not finalised under them.
	keys := openKeys(t, newURI, unique("softhsm-")+"-")
	if _, err := keys.NewKey(t.Context()); err != nil {
		t.Fatalf("NewKey in the new token: %v", err)
	}
	digest := sha256.Sum256([]byte("still here"))
	if _, err := busy.Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
		t.Errorf("Sign in the shared token: %v", err)
	}

	// Again: same URI, same PIN, no new token.
	again, release2, err := hsm.SoftHSM(dir, label, "")
	if err != nil {
		t.Fatalf("second SoftHSM: %v", err)
	}
	release2()
	release2() // idempotent
	if again != newURI {
		t.Errorf("second URI %s, want %s", again, newURI)
	}
	if got := tokenDirs(t, dir); got != n+1 {
		t.Errorf("%d token directories after the second call, want %d", got, n+1)
	}
	if pin2, _ := os.ReadFile(hsm.DefaultPINFile(dir)); string(pin2) != string(pin) {
		t.Error("the PIN changed")
	}
}

// Concurrent first uses of one label make one token. Not parallel: it counts token
// directories.
func TestSoftHSMConcurrentCreation(t *testing.T) {
	dir, _ := softHSM(t)
	n := tokenDirs(t, dir)
	label := unique("hsm-race-")
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		uris = map[string]int{}
	)
	for range 4 {
		wg.Go(func() {
			uri, release, err := hsm.SoftHSM(dir, label, "")
			if err != nil {
				t.Errorf("SoftHSM: %v", err)
				return
			}
			defer release()
			mu.Lock()
			uris[uri]++
			mu.Unlock()
		})
	}
	wg.Wait()
	if len(uris) != 1 {
		t.Errorf("URIs %v, want one", uris)
	}
	if got := tokenDirs(t, dir); got != n+1 {
		t.Errorf("%d token directories, want %d", got, n+1)
	}
}

// While this process uses the shared directory, another one is refused before anything
// is written to it.
func TestSoftHSMInUse(t *testing.T) {
	t.Parallel()
	softHSM(t)
	other := t.TempDir()
	_, _, err := hsm.SoftHSM(other, "other", "")
	if !errors.Is(err, hsm.ErrSoftHSMInUse) {
		t.Fatalf("SoftHSM with a second directory: %v, want ErrSoftHSMInUse", err)
	}
	if ents, _ := os.ReadDir(other); len(ents) != 0 {
		t.Errorf("the refused directory has %d entries", len(ents))
	}
}

func TestSoftHSMInvalidLabel(t *testing.T) {
	t.Parallel()
	dir := t.TempDir() // never reached: labels are checked first
	for _, tc := range []struct{ name, label string }{
		{"empty", ""},
		{"33 bytes", strings.Repeat("l", 33)},
		{"trailing space", "label "},
		{"control character", "a\x00b"},
		{"not UTF-8", "a\xffb"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, err := hsm.SoftHSM(dir, tc.label, ""); !errors.Is(err, hsm.ErrInvalidLabel) {
				t.Errorf("SoftHSM(%q): %v, want ErrInvalidLabel", tc.label, err)
			}
		})
	}
}

func TestRedactURI(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, in, want string }{
		{"query", "pkcs11:token=t?pin-value=1234", "pkcs11:token=t?pin-value=REDACTED"},
		{"opaque", "pkcs11:token=t;pin-value=1234", "pkcs11:token=t;pin-value=REDACTED"},
		{"escaped name", "pkcs11:token=t?pin%2Dvalue=1234&x=y", "pkcs11:token=t?pin-value=REDACTED&x=y"},
		{"pin-source kept as written", "pkcs11:token=t?pin-source=file:///a%20b/hsm.pin", "pkcs11:token=t?pin-source=file:///a%20b/hsm.pin"},
		{"unparsable", "pkcs11:token=t?pin-value=1234%zz\x7f", "<unparsable pkcs11 uri>"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := hsm.RedactURI(tc.in); got != tc.want {
				t.Errorf("RedactURI(%q) = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
}
