package hsm_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/agentmesh/agentmesh/hsm"
)

// A key named by Ref is found again by Open in a store opened after the first one was
// closed (what a restarted process does): same public key, signs in the token, and is
// destroyed by the new store; then nothing is found any more.
func TestOpenAfterRestart(t *testing.T) {
	t.Parallel()
	_, uri := softHSM(t)
	prefix := unique("reopen-") + "-"
	first := openKeys(t, uri, prefix)
	made, ref := newKeyRef(t, first)
	if err := first.Close(); err != nil { // the process ends
		t.Fatal(err)
	}

	later := openKeys(t, uri, prefix)
	key, err := later.Open(t.Context(), ref)
	if err != nil {
		t.Fatalf("Open(%s) after the first store closed: %v", ref, err)
	}
	pub, ok := key.Public().(*ecdsa.PublicKey)
	if !ok || !pub.Equal(made.Public()) {
		t.Fatalf("Open returned public key %v, want the one made: %v", key.Public(), made.Public())
	}
	digest := sha256.Sum256([]byte("renewal csr"))
	sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil || !ecdsa.VerifyASN1(pub, digest[:], sig) {
		t.Fatalf("Sign with the opened key: %v (verifies: %t)", err, err == nil && ecdsa.VerifyASN1(pub, digest[:], sig))
	}
	if got, err := later.Ref(key); err != nil || got != ref {
		t.Errorf("Ref of the opened key = %q, %v; want %q", got, err, ref)
	}
	if err := later.Destroy(t.Context(), key); err != nil {
		t.Fatalf("Destroy of the opened key: %v", err)
	}
	if _, err := later.Open(t.Context(), ref); !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Errorf("Open after Destroy: %v, want ErrKeyNotFound", err)
	}
	if listed, err := later.List(t.Context()); err != nil || len(listed) != 0 {
		t.Errorf("List after Destroy = %v, %v; want none", listed, err)
	}
}

// Open finds only keys of its own store (TestPrefixesAndPersistence checks that Ref
// names only those).
func TestOpenUnknown(t *testing.T) {
	t.Parallel()
	_, uri := softHSM(t)
	a := openKeys(t, uri, unique("open-a-")+"-")
	b := openKeys(t, uri, unique("open-b-")+"-")
	_, refB := newKeyRef(t, b)
	for _, tc := range []struct{ name, ref string }{
		{"another store's key", refB},
		{"empty", ""},
		{"not hex", "open-a-x"},
	} {
		if _, err := a.Open(t.Context(), tc.ref); !errors.Is(err, hsm.ErrKeyNotFound) {
			t.Errorf("Open(%s): %v, want ErrKeyNotFound", tc.name, err)
		}
	}
}

// A key pair planted under a label of the store, but extractable and not sensitive,
// is refused: Open never hands out a key whose value could have left the token. Not
// parallel: it writes objects through its own PKCS#11 session (see TestKeyLifecycle).
func TestOpenRefusesExtractable(t *testing.T) {
	_, uri := softHSM(t)
	prefix := unique("planted-") + "-"
	keys := openKeys(t, uri, prefix)
	id := make([]byte, 16)
	_, _ = rand.Read(id)
	label := prefix + hex.EncodeToString(id)
	p, s := rawSession(t, sharedToken)
	p256, _ := asn1.Marshal(asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7})
	// Both halves carry the store's label and ID, as NewKey's do.
	named := func(attrs ...*pkcs11.Attribute) []*pkcs11.Attribute {
		return append(attrs, pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id), pkcs11.NewAttribute(pkcs11.CKA_LABEL, label))
	}
	pubH, privH, err := p.GenerateKeyPair(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_EC_KEY_PAIR_GEN, nil)},
		named(pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true), pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, p256)),
		named(pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true), pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
			pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false), pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true)))
	if err != nil {
		t.Fatalf("plant a key pair: %v", err)
	}
	t.Cleanup(func() {
		_ = p.DestroyObject(s, privH)
		_ = p.DestroyObject(s, pubH)
	})
	if _, err := keys.Open(t.Context(), label); !errors.Is(err, hsm.ErrKeyRefused) {
		t.Errorf("Open of an extractable key: %v, want ErrKeyRefused", err)
	}
}

// newKeyRef makes a key in keys and returns it with its reference.
func newKeyRef(t *testing.T, keys *hsm.Keys) (crypto.Signer, string) {
	t.Helper()
	key, err := keys.NewKey(t.Context())
	if err != nil {
		t.Fatalf("NewKey: %v", err)
	}
	ref, err := keys.Ref(key)
	if err != nil {
		t.Fatalf("Ref: %v", err)
	}
	return key, ref
}
