package hsm_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/asn1"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/miekg/pkcs11"
	"go.step.sm/crypto/kms/apiv1"

	"github.com/agentmesh/agentmesh/hsm"
)

// KeyStore is the rotator's interface (rotator.KeyStore), restated so that this test
// checks Keys satisfies it without hsm importing the rotator.
type KeyStore interface {
	NewKey(ctx context.Context) (crypto.Signer, error)
	Destroy(ctx context.Context, key crypto.Signer) error
}

var _ KeyStore = (*hsm.Keys)(nil)

// The whole life of a workload key, checked against the token itself: generated in the
// token, signing through PKCS#11, sensitive and never extractable, nothing outside the
// token directory, and gone after Destroy. Not parallel: its own PKCS#11 session reads
// and writes objects outside hsm's serialisation, which SoftHSM's object store does
// not survive next to concurrent key generation (see tokenMu in softhsm.go).
func TestKeyLifecycle(t *testing.T) {
	dir, uri := softHSM(t)
	prefix := unique("lifecycle-") + "-"
	keys := openKeys(t, uri, prefix)
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	before, beforeWD := snapshot(t, dir), snapshot(t, wd)

	signer, err := keys.NewKey(t.Context())
	if err != nil {
		t.Fatalf("NewKey: %v", err)
	}
	key, ok := signer.(*hsm.Key)
	if !ok {
		t.Fatalf("NewKey returned %T, want *hsm.Key", signer)
	}
	label := key.Label()
	if !strings.HasPrefix(label, prefix) || len(label) != len(prefix)+32 {
		t.Errorf("label %q: want the prefix and 32 hex characters", label)
	}

	// Signing works and verifies with the public key, as crypto/tls and x509 use it.
	pub, ok := key.Public().(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Fatalf("public key %T, want ECDSA P-256", key.Public())
	}
	digest := sha256.Sum256([]byte("handshake transcript"))
	sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	if !ecdsa.VerifyASN1(pub, digest[:], sig) {
		t.Fatal("the signature does not verify")
	}
	other := sha256.Sum256([]byte("another message"))
	if ecdsa.VerifyASN1(pub, other[:], sig) {
		t.Fatal("the signature verifies another digest")
	}

	// The objects in the token, read through PKCS#11 beside the Keys.
	p, s := rawSession(t, sharedToken)
	privs := findObjects(t, p, s, label, pkcs11.CKO_PRIVATE_KEY)
	pubs := findObjects(t, p, s, label, pkcs11.CKO_PUBLIC_KEY)
	if len(privs) != 1 || len(pubs) != 1 {
		t.Fatalf("objects labelled %s: %d private, %d public; want one each", label, len(privs), len(pubs))
	}
	attrs, err := p.GetAttributeValue(s, privs[0], []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_ALWAYS_SENSITIVE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_NEVER_EXTRACTABLE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_LOCAL, nil),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, nil),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, nil),
	})
	if err != nil {
		t.Fatalf("read attributes: %v", err)
	}
	want := map[uint]string{
		pkcs11.CKA_TOKEN: "true", pkcs11.CKA_PRIVATE: "true",
		pkcs11.CKA_SENSITIVE: "true", pkcs11.CKA_EXTRACTABLE: "false",
		pkcs11.CKA_ALWAYS_SENSITIVE: "true", pkcs11.CKA_NEVER_EXTRACTABLE: "true",
		pkcs11.CKA_LOCAL: "true", pkcs11.CKA_SIGN: "true", pkcs11.CKA_DERIVE: "false",
	}
	for _, a := range attrs {
		if got := boolAttr(a); got != want[a.Type] {
			t.Errorf("attribute %#x = %s, want %s", a.Type, got, want[a.Type])
		}
	}
	params, err := p.GetAttributeValue(s, privs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, nil)})
	if err != nil {
		t.Fatal(err)
	}
	if p256, _ := asn1.Marshal(asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7}); string(params[0].Value) != string(p256) {
		t.Errorf("CKA_EC_PARAMS %x, want the P-256 OID", params[0].Value)
	}
	// The value cannot be read, and the one-way attributes cannot be turned back.
	if _, err := p.GetAttributeValue(s, privs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)}); !errors.Is(err, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_SENSITIVE)) {
		t.Errorf("reading CKA_VALUE: %v, want CKR_ATTRIBUTE_SENSITIVE", err)
	}
	for _, a := range []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
	} {
		if err := p.SetAttributeValue(s, privs[0], []*pkcs11.Attribute{a}); err == nil {
			t.Errorf("setting attribute %#x succeeded", a.Type)
		}
	}

	// Nothing was written outside the token directory, neither in the SoftHSM directory
	// nor in the working directory; in the token directory the private object is
	// encrypted (its label, in clear in the public object, appears in one file only).
	after := snapshot(t, dir)
	for _, f := range slices.Sorted(maps.Keys(after)) {
		if after[f] != before[f] && !strings.HasPrefix(f, "tokens"+string(filepath.Separator)) {
			t.Errorf("%s changed outside the token directory", f)
		}
	}
	if !maps.Equal(beforeWD, snapshot(t, wd)) {
		t.Error("the working directory changed")
	}
	if files := filesContaining(t, dir, []byte(label)); len(files) != 1 {
		t.Errorf("files holding the label in clear: %v, want just the public object", files)
	}

	listed, err := keys.List(t.Context())
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	if !slices.Contains(listed, label) {
		t.Fatalf("List = %v, want it to contain %s", listed, label)
	}

	if err := keys.Destroy(t.Context(), key); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	listed, err = keys.List(t.Context())
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	if slices.Contains(listed, label) {
		t.Errorf("List after Destroy = %v, still has %s", listed, label)
	}
	if n, m := len(findObjects(t, p, s, label, pkcs11.CKO_PRIVATE_KEY)), len(findObjects(t, p, s, label, pkcs11.CKO_PUBLIC_KEY)); n+m != 0 {
		t.Errorf("after Destroy the token still has %d private and %d public objects labelled %s", n, m, label)
	}
	if files := filesContaining(t, dir, []byte(label)); len(files) != 0 {
		t.Errorf("after Destroy files still hold the label: %v", files)
	}
	if _, err := key.Sign(rand.Reader, digest[:], crypto.SHA256); !errors.Is(err, hsm.ErrDestroyed) {
		t.Errorf("Sign after Destroy: %v, want ErrDestroyed", err)
	}
	if key.Public() == nil {
		t.Error("Public after Destroy is nil")
	}
	if err := keys.Destroy(t.Context(), key); err != nil {
		t.Errorf("second Destroy: %v, want nil", err)
	}
}

// Destroy is cleanup: it runs with a cancelled context, while NewKey and List do not.
func TestCancelledContext(t *testing.T) {
	t.Parallel()
	_, uri := softHSM(t)
	keys := openKeys(t, uri, unique("cancel-")+"-")
	key, err := keys.NewKey(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := keys.NewKey(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("NewKey: %v, want context.Canceled", err)
	}
	if _, err := keys.List(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("List: %v, want context.Canceled", err)
	}
	if err := keys.Destroy(ctx, key); err != nil {
		t.Errorf("Destroy: %v", err)
	}
	if _, err := hsm.OpenKeys(ctx, uri, "cancel-"); !errors.Is(err, context.Canceled) {
		t.Errorf("OpenKeys: %v, want context.Canceled", err)
	}
}

// Each store sees, names and destroys only its own keys; keys survive Close and are
// listed by the next store with the prefix (what a restarted process finds).
func TestPrefixesAndPersistence(t *testing.T) {
	t.Parallel()
	_, uri := softHSM(t)
	prefixA, prefixB := unique("prefix-a-")+"-", unique("prefix-b-")+"-"
	a := openKeys(t, uri, prefixA)
	b := openKeys(t, uri, prefixB)
	ka, err := a.NewKey(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	kb, err := b.NewKey(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	la, lb := ka.(*hsm.Key).Label(), kb.(*hsm.Key).Label()
	if got, err := a.List(t.Context()); err != nil || !slices.Equal(got, []string{la}) {
		t.Errorf("a.List = %v, %v; want [%s]", got, err, la)
	}
	if got, err := b.List(t.Context()); err != nil || !slices.Equal(got, []string{lb}) {
		t.Errorf("b.List = %v, %v; want [%s]", got, err, lb)
	}

	for _, tc := range []struct {
		name string
		key  crypto.Signer
	}{
		{"another store's key", kb},
		{"an in-memory key", mustECDSA(t)},
		{"nil", nil},
	} {
		if err := a.Destroy(t.Context(), tc.key); !errors.Is(err, hsm.ErrUnknownKey) {
			t.Errorf("Destroy(%s): %v, want ErrUnknownKey", tc.name, err)
		}
		if _, err := a.Ref(tc.key); !errors.Is(err, hsm.ErrUnknownKey) {
			t.Errorf("Ref(%s): %v, want ErrUnknownKey", tc.name, err)
		}
	}

	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	again := openKeys(t, uri, prefixA)
	if got, err := again.List(t.Context()); err != nil || !slices.Equal(got, []string{la}) {
		t.Errorf("List after reopening = %v, %v; want [%s]", got, err, la)
	}
	if err := b.Destroy(t.Context(), kb); err != nil {
		t.Fatal(err)
	}
	if got, err := b.List(t.Context()); err != nil || len(got) != 0 {
		t.Errorf("b.List = %v, %v; want none", got, err)
	}
}

// After Close, nothing works, and Close again is fine.
func TestClose(t *testing.T) {
	t.Parallel()
	_, uri := softHSM(t)
	prefix := unique("close-") + "-"
	keys, err := hsm.OpenKeys(t.Context(), uri, prefix)
	if err != nil {
		t.Fatal(err)
	}
	key, err := keys.NewKey(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if err := keys.Close(); err != nil {
		t.Fatal(err)
	}
	if err := keys.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	digest := sha256.Sum256([]byte("x"))
	if _, err := key.Sign(rand.Reader, digest[:], crypto.SHA256); !errors.Is(err, hsm.ErrClosed) {
		t.Errorf("Sign: %v, want ErrClosed", err)
	}
	if _, err := keys.NewKey(t.Context()); !errors.Is(err, hsm.ErrClosed) {
		t.Errorf("NewKey: %v, want ErrClosed", err)
	}
	if _, err := keys.List(t.Context()); !errors.Is(err, hsm.ErrClosed) {
		t.Errorf("List: %v, want ErrClosed", err)
	}
	if err := keys.Destroy(t.Context(), key); !errors.Is(err, hsm.ErrClosed) {
		t.Errorf("Destroy: %v, want ErrClosed", err)
	}

	// The key is still in the token: a new store deletes nothing it did not make, but
	// lists it.
	again := openKeys(t, uri, prefix)
	if got, err := again.List(t.Context()); err != nil || !slices.Equal(got, []string{key.(*hsm.Key).Label()}) {
		t.Errorf("List = %v, %v; want the closed store's key", got, err)
	}
}

// Signing from many goroutines while keys are made, listed and destroyed: every
// signature verifies, and once Destroy has run, signing fails with ErrDestroyed (never
// with a token error). Destroy comes after 100 signatures; each signer loops until it is
// refused.
func TestConcurrentUse(t *testing.T) {
	t.Parallel()
	_, uri := softHSM(t)
	keys := openKeys(t, uri, unique("concurrent-")+"-")
	key, err := keys.NewKey(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	pub := key.Public().(*ecdsa.PublicKey)
	digest := sha256.Sum256([]byte("concurrent"))

	const signers, threshold = 8, 100
	var (
		wg       sync.WaitGroup
		signed   atomic.Int64
		enough   = make(chan struct{}) // closed at the threshold-th signature
		refused  atomic.Int64
		failures atomic.Int64
	)
	for range signers {
		wg.Go(func() {
			for {
				sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
				switch {
				case errors.Is(err, hsm.ErrDestroyed):
					refused.Add(1)
					return
				case err != nil:
					t.Errorf("Sign: %v", err)
					failures.Add(1)
					return
				case !ecdsa.VerifyASN1(pub, digest[:], sig):
					t.Error("a signature does not verify")
					failures.Add(1)
					return
				}
				if signed.Add(1) == threshold {
					close(enough)
				}
			}
		})
	}
	// Errorf, not Fatalf, until the signers have stopped.
	for range 5 {
		k, err := keys.NewKey(t.Context())
		if err != nil {
			t.Errorf("NewKey: %v", err)
			break
		}
		if got, err := keys.List(t.Context()); err != nil || !slices.Contains(got, k.(*hsm.Key).Label()) {
			t.Errorf("List = %v, %v; want it to contain the new key", got, err)
		}
		if err := keys.Destroy(t.Context(), k); err != nil {
			t.Errorf("Destroy: %v", err)
		}
	}
	stopped := make(chan struct{})
	go func() { wg.Wait(); close(stopped) }()
	select {
	case <-enough:
	case <-stopped: // every signer failed early
	}
	if err := keys.Destroy(t.Context(), key); err != nil {
		t.Errorf("Destroy: %v", err)
	}
	<-stopped
	t.Logf("%d signatures before Destroy", signed.Load())
	if refused.Load()+failures.Load() != signers {
		t.Errorf("%d signers refused with ErrDestroyed, want %d", refused.Load(), signers)
	}
	if got, err := keys.List(t.Context()); err != nil || len(got) != 0 {
		t.Errorf("List = %v, %v; want none", got, err)
	}
}

func TestOpenKeysErrors(t *testing.T) {
	t.Parallel()
	_, uri := softHSM(t)
	// A token nobody in this process is logged in to: a login with a wrong PIN would
	// otherwise be reported as already done.
	lonely := token(t, "hsm-wrong-pin")
	wrongPIN := strings.Replace(lonely, "?pin-source=", "?pin-value=0000wrong&x=", 1)
	missingPIN := strings.TrimSuffix(uri, ".pin") + ".no-such-pin"
	for _, tc := range []struct {
		name, uri, prefix string
		want              error
		mustNot           string
	}{
		{"wrong pin", wrongPIN, "p-", hsm.ErrToken, "0000wrong"},
		{"missing pin file", missingPIN, "p-", hsm.ErrToken, ""},
		{"missing token", "pkcs11:module-path=" + hsm.SoftHSMModule + ";token=no-such-token?pin-value=1234", "p-", hsm.ErrToken, "1234"},
		{"missing module", "pkcs11:module-path=/nonexistent/libpkcs11.so;token=t?pin-value=1234", "p-", hsm.ErrToken, "1234"},
		{"malformed uri", "pkcs11:token=t;%zz?pin-value=1234", "p-", hsm.ErrToken, "1234"},
		{"not pkcs11", "softkms:token=t?pin-value=1234", "p-", hsm.ErrToken, "1234"},
		{"empty prefix", uri, "", hsm.ErrInvalidLabel, ""},
		{"control character in prefix", uri, "a\nb", hsm.ErrInvalidLabel, ""},
		{"long prefix", uri, strings.Repeat("p", 65), hsm.ErrInvalidLabel, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			keys, err := hsm.OpenKeys(t.Context(), tc.uri, tc.prefix)
			if err == nil {
				_ = keys.Close()
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("OpenKeys: %v, want %v", err, tc.want)
			}
			if tc.mustNot != "" && strings.Contains(err.Error(), tc.mustNot) {
				t.Errorf("the error leaks %q: %v", tc.mustNot, err)
			}
			t.Logf("OpenKeys: %v", err)
		})
	}
}

// The store opens the same URIs as the KMS, and the KMS sees the store's keys: the
// CA and the proxy can share one token. Not parallel: the KMS searches the token
// outside hsm's serialisation (see TestKeyLifecycle).
func TestOpenKMS(t *testing.T) {
	_, uri := softHSM(t)
	keys := openKeys(t, uri, unique("kms-")+"-")
	key, err := keys.NewKey(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	km, err := hsm.OpenKMS(t.Context(), uri)
	if err != nil {
		t.Fatalf("OpenKMS: %v", err)
	}
	defer func() { _ = km.Close() }()
	signer, err := km.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: "pkcs11:object=" + key.(*hsm.Key).Label()})
	if err != nil {
		t.Fatalf("CreateSigner: %v", err)
	}
	if !signer.Public().(*ecdsa.PublicKey).Equal(key.Public()) {
		t.Error("the KMS sees another public key")
	}
	if err := keys.Destroy(t.Context(), key); err != nil {
		t.Fatal(err)
	}

	if _, err := hsm.OpenKMS(t.Context(), "pkcs11:token=t;%zz?pin-value=1234"); !errors.Is(err, hsm.ErrToken) || strings.Contains(err.Error(), "1234") {
		t.Errorf("OpenKMS with a malformed URI: %v, want ErrToken without the PIN", err)
	}
	if _, err := hsm.OpenKMS(t.Context(), "pkcs11:module-path="+hsm.SoftHSMModule+";token=no-such-token?pin-value=1234"); !errors.Is(err, hsm.ErrToken) {
		t.Errorf("OpenKMS with a missing token: %v, want ErrToken", err)
	}
}

func mustECDSA(tb testing.TB) crypto.Signer {
	tb.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	return k
}
