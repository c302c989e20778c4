package hsm_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/agentmesh/agentmesh/hsm"
	"github.com/agentmesh/agentmesh/internal/softhsmtest"
)

// sharedToken is the label of the token most tests use.
const sharedToken = "hsm-test"

// shared is the one SoftHSM directory of this test process: every test (parallel ones
// included) uses it, with its own token or its own key label prefix. Its name is one
// the PKCS#11 URI must escape, and SoftHSM's configuration must carry. TestMain
// removes it after all tests.
var shared = softhsmtest.Dir{Pattern: "agentmesh hsm+test;", Label: sharedToken}

func TestMain(m *testing.M) {
	m.Run() // its result becomes the exit code when TestMain returns
	shared.Remove()
}

// softHSM returns the shared SoftHSM directory and the URI of its shared token, and
// skips the test when SoftHSM2 is not installed.
func softHSM(tb testing.TB) (dir, uri string) {
	tb.Helper()
	return shared.Token(tb)
}

// token prepares the token label in the shared directory for one test and returns its
// URI; the test's cleanup releases it.
func token(tb testing.TB, label string) string {
	tb.Helper()
	dir, _ := softHSM(tb)
	uri, release, err := hsm.SoftHSM(dir, label, "")
	if err != nil {
		tb.Fatalf("SoftHSM(%q): %v", label, err)
	}
	tb.Cleanup(release)
	return uri
}

// openKeys opens a key store on uri, closed by the test's cleanup.
func openKeys(tb testing.TB, uri, prefix string) *hsm.Keys {
	tb.Helper()
	keys, err := hsm.OpenKeys(tb.Context(), uri, prefix)
	if err != nil {
		tb.Fatalf("OpenKeys: %v", err)
	}
	tb.Cleanup(func() {
		if err := keys.Close(); err != nil {
			tb.Errorf("Close: %v", err)
		}
	})
	return keys
}

// rawSession opens a read-write session on the token label through miekg/pkcs11 in
// this process, beside the test's own Keys. The module is already initialised (the
// caller has keys open), so it is neither initialised nor finalised here, and the
// session shares the login of the Keys' contexts (PKCS#11 logs in per token and process).
func rawSession(tb testing.TB, label string) (*pkcs11.Ctx, pkcs11.SessionHandle) {
	tb.Helper()
	p := pkcs11.New(hsm.SoftHSMModule)
	if p == nil {
		tb.Fatalf("load %s", hsm.SoftHSMModule)
	}
	tb.Cleanup(p.Destroy)
	if err := p.Initialize(); !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		if err == nil {
			_ = p.Finalize()
		}
		tb.Fatalf("Initialize: %v, want CKR_CRYPTOKI_ALREADY_INITIALIZED (keys are open)", err)
	}
	slots, err := p.GetSlotList(true)
	if err != nil {
		tb.Fatal(err)
	}
	for _, slot := range slots {
		ti, err := p.GetTokenInfo(slot)
		if err != nil || ti.Label != label {
			continue
		}
		s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { _ = p.CloseSession(s) })
		return p, s
	}
	tb.Fatalf("no token %q", label)
	return nil, 0
}

// findObjects returns the handles of the objects labelled label.
func findObjects(tb testing.TB, p *pkcs11.Ctx, s pkcs11.SessionHandle, label string, class uint) []pkcs11.ObjectHandle {
	tb.Helper()
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
	}
	if err := p.FindObjectsInit(s, tmpl); err != nil {
		tb.Fatal(err)
	}
	defer func() { _ = p.FindObjectsFinal(s) }()
	var all []pkcs11.ObjectHandle
	for {
		hs, _, err := p.FindObjects(s, 16)
		if err != nil {
			tb.Fatal(err)
		}
		if len(hs) == 0 {
			return all
		}
		all = append(all, hs...)
	}
}

// unique returns base with a random suffix: tokens and keys outlive a test in the
// shared directory, and -count=N runs a test again in it.
func unique(base string) string {
	return base + rand.Text()[:8]
}

// snapshot maps every regular file under dir to the SHA-256 of its content.
func snapshot(tb testing.TB, dir string) map[string][32]byte {
	tb.Helper()
	files := map[string][32]byte{}
	eachFile(tb, dir, func(path string, b []byte) {
		rel, _ := filepath.Rel(dir, path)
		files[rel] = sha256.Sum256(b)
	})
	return files
}

// filesContaining returns the files under dir whose content contains needle.
func filesContaining(tb testing.TB, dir string, needle []byte) []string {
	tb.Helper()
	var found []string
	eachFile(tb, dir, func(path string, b []byte) {
		if bytes.Contains(b, needle) {
			found = append(found, path)
		}
	})
	return found
}

// eachFile calls fn with the path and content of every regular file under dir,
// skipping files a parallel test deletes meanwhile.
func eachFile(tb testing.TB, dir string, fn func(path string, content []byte)) {
	tb.Helper()
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		b, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		} else if err != nil {
			return err
		}
		fn(path, b)
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
}

func boolAttr(a *pkcs11.Attribute) string {
	if len(a.Value) != 1 {
		return fmt.Sprintf("%x", a.Value)
	}
	return fmt.Sprint(a.Value[0] != 0)
}
