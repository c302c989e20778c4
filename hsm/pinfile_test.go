package hsm_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	kmsuri "go.step.sm/crypto/kms/uri"

	"github.com/agentmesh/agentmesh/hsm"
)

// TestSoftHSMPINFile: the PIN lives outside the SoftHSM directory. A directory of an
// earlier version, with its PIN in dir/hsm.pin, has it moved out on the next start and
// its token keeps working; a PIN file inside the directory, or two different PINs, are
// refused; a PIN file elsewhere (a systemd credential) is used as it is. Not parallel:
// it moves the shared directory's PIN file.
func TestSoftHSMPINFile(t *testing.T) {
	dir, _ := softHSM(t)
	label := unique("hsm-pin ")
	uri := token(t, label)
	pinFile := hsm.DefaultPINFile(dir)
	pin, err := os.ReadFile(pinFile)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := kmsuri.ParseWithScheme("pkcs11", uri); got == nil || got.Get("pin-source") != "file://"+pinFile {
		t.Errorf("URI %s does not name %s", uri, pinFile)
	}

	// The layout of an earlier version.
	legacy := filepath.Join(dir, "hsm.pin")
	if err := os.Rename(pinFile, legacy); err != nil {
		t.Fatal(err)
	}
	again, release, err := hsm.SoftHSM(dir, label, "")
	if err != nil {
		t.Fatalf("SoftHSM over the old layout: %v", err)
	}
	release()
	if again != uri {
		t.Errorf("URI after the migration %s, want %s", again, uri)
	}
	if moved, err := os.ReadFile(pinFile); err != nil || string(moved) != string(pin) {
		t.Errorf("PIN after the migration %q, %v; want the old one", moved, err)
	}
	if _, err := os.Stat(legacy); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the old PIN file is still in the directory: %v", err)
	}
	if _, err := openKeys(t, again, unique("pin-")+"-").NewKey(t.Context()); err != nil {
		t.Errorf("the token after the migration: %v", err)
	}

	// Two different PINs: nothing is guessed, nothing is removed.
	if err := os.WriteFile(legacy, []byte("0123456789abcdef0123456789abcdef"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := hsm.SoftHSM(dir, label, ""); !errors.Is(err, hsm.ErrPINFile) {
		t.Errorf("two different PINs: %v, want ErrPINFile", err)
	}
	if err := os.Remove(legacy); err != nil {
		t.Fatal(err)
	}

	if _, _, err := hsm.SoftHSM(dir, label, filepath.Join(dir, "tokens", "hsm.pin")); !errors.Is(err, hsm.ErrPINFile) {
		t.Errorf("a PIN file inside the directory: %v, want ErrPINFile", err)
	}

	// A credential: a read-only copy somewhere else.
	cred := filepath.Join(t.TempDir(), "hsm.pin")
	if err := os.WriteFile(cred, pin, 0o400); err != nil {
		t.Fatal(err)
	}
	credURI, release, err := hsm.SoftHSM(dir, label, cred)
	if err != nil {
		t.Fatalf("SoftHSM with a credential: %v", err)
	}
	defer release()
	if !strings.Contains(credURI, "hsm.pin") {
		t.Errorf("URI %s does not name the credential", credURI)
	}
	if _, err := openKeys(t, credURI, unique("cred-")+"-").NewKey(t.Context()); err != nil {
		t.Errorf("the token through the credential: %v", err)
	}
}
