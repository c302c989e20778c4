package hsm

import (
	"context"
	"crypto"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"
)

// maxPrefix leaves room for the 32 hex characters NewKey appends, in labels that stay
// readable in pkcs11-tool listings.
const maxPrefix = 64

// keyIDLen is the length of the CKA_ID of each key, random; its label ends in it, in hex.
const keyIDLen = 16

// listAttempts bounds the retries of List when a key is destroyed while it is listed.
const listAttempts = 3

// Keys is a key store whose keys are generated inside a PKCS#11 token: EC P-256, one
// token object per key with a unique label (the prefix and 32 random hex characters),
// private half CKA_SENSITIVE and not CKA_EXTRACTABLE (so also "always sensitive" and
// "never extractable"), CKA_PRIVATE, CKA_SIGN only. Every signature is computed by the
// token. It satisfies the rotator's KeyStore (NewKey, Destroy) without importing it.
//
// Keys are token objects, so they outlive the process: a key whose process died before
// Destroy stays in the token until it is deleted (List shows it), and a later process
// uses it again through Open with the reference Ref gave.
//
// All methods are safe to call concurrently.
type Keys struct {
	p11       *crypto11.Context
	prefix    string
	closed    atomic.Bool
	closeOnce sync.Once
}

// OpenKeys opens the token named by uri (a PKCS#11 URI as go.step.sm/crypto/kms/pkcs11
// reads it, such as the one SoftHSM returns) and logs in. The keys it makes and lists
// are those whose label starts with labelPrefix (1 to 64 bytes, no control
// characters); give each key store on a token its own prefix, none a prefix of another.
//
// A token is one login per process: while any context in the process is logged in to
// it, PKCS#11 reports a further login as already done, whatever its PIN.
func OpenKeys(ctx context.Context, uri, labelPrefix string) (*Keys, error) {
	if err := checkLabel(labelPrefix, maxPrefix); err != nil {
		return nil, fmt.Errorf("%w: key label prefix %q: %w", ErrInvalidLabel, labelPrefix, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("hsm: open keys: %w", err)
	}
	cfg, err := crypto11Config(uri)
	if err != nil {
		return nil, err
	}
	tokenMu.Lock()
	p11, err := crypto11.Configure(cfg)
	tokenMu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("%w: open token %s: %w", ErrToken, RedactURI(uri), err)
	}
	return &Keys{p11: p11, prefix: labelPrefix}, nil
}

// NewKey generates a key pair in the token and returns its signer, a *Key. ctx is
// checked before the token is asked: a PKCS#11 call cannot be interrupted.
func (k *Keys) NewKey(ctx context.Context) (crypto.Signer, error) {
	if err := k.usable(ctx); err != nil {
		return nil, fmt.Errorf("hsm: new key: %w", err)
	}
	id := make([]byte, keyIDLen)
	_, _ = rand.Read(id) // never fails
	label := k.prefix + hex.EncodeToString(id)

	pub, err := crypto11.NewAttributeSetWithIDAndLabel(id, []byte(label))
	if err != nil {
		return nil, fmt.Errorf("hsm: new key: %w", err)
	}
	priv := pub.Copy()
	// Set explicitly rather than trusting crypto11's or the token's defaults: these are
	// the properties the key's security rests on.
	if err := setAll(pub, map[crypto11.AttributeType]bool{
		crypto11.CkaToken:   true,
		crypto11.CkaPrivate: false,
		crypto11.CkaVerify:  true,
	}); err != nil {
		return nil, fmt.Errorf("hsm: new key: %w", err)
	}
	if err := setAll(priv, map[crypto11.AttributeType]bool{
		crypto11.CkaToken:       true,
		crypto11.CkaPrivate:     true, // SoftHSM encrypts private objects in its files
		crypto11.CkaSensitive:   true,
		crypto11.CkaExtractable: false,
		crypto11.CkaSign:        true,
		crypto11.CkaDerive:      false,
	}); err != nil {
		return nil, fmt.Errorf("hsm: new key: %w", err)
	}
	tokenMu.Lock()
	s, err := k.p11.GenerateECDSAKeyPairWithAttributes(pub, priv, elliptic.P256())
	tokenMu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("%w: generate key %s: %w", ErrToken, label, err)
	}
	return &Key{keys: k, id: id, label: label, signer: s, pub: s.Public()}, nil
}

// Destroy deletes key, made by NewKey of this Keys, from the token: its private and its
// public object. It waits for signatures in progress with the key; later ones fail with
// ErrDestroyed. Destroying a destroyed key does nothing. If the token fails before the
// private object is gone, Destroy returns the error and the key stays usable, so a
// retry can finish the job; once the private object is gone, a public object left
// behind (which holds nothing secret) is not an error.
//
// ctx is not consulted: destruction is cleanup that must not be skipped because the
// caller is shutting down, and a PKCS#11 call cannot be interrupted anyway.
//
// The private key never was in this process's memory, so there is nothing to overwrite
// here; see the package documentation for what deletion means inside SoftHSM.
func (k *Keys) Destroy(_ context.Context, key crypto.Signer) error {
	kk, ok := key.(*Key)
	if !ok || kk.keys != k {
		return ErrUnknownKey
	}
	if k.closed.Load() {
		return fmt.Errorf("hsm: destroy %s: %w", kk.label, ErrClosed)
	}
	kk.mu.Lock()
	defer kk.mu.Unlock()
	if kk.signer == nil {
		return nil
	}
	tokenMu.Lock()
	defer tokenMu.Unlock()
	if err := kk.signer.Delete(); err != nil {
		// crypto11 deletes the private object first: find out whether it went.
		left, ferr := k.p11.FindPrivateKeys(kk.id, []byte(kk.label))
		if ferr != nil || len(left) > 0 {
			return fmt.Errorf("%w: destroy %s: %w", ErrToken, kk.label, err)
		}
	}
	kk.signer = nil
	return nil
}

// List returns, sorted, the labels of the EC private key objects in the token whose
// label starts with the prefix: the keys of this store that are not destroyed,
// including those left by an earlier process.
func (k *Keys) List(ctx context.Context) ([]string, error) {
	if err := k.usable(ctx); err != nil {
		return nil, fmt.Errorf("hsm: list keys: %w", err)
	}
	var (
		labels []string
		err    error
	)
	for range listAttempts {
		tokenMu.Lock()
		labels, err = k.list()
		tokenMu.Unlock()
		if !errors.Is(err, pkcs11.Error(pkcs11.CKR_OBJECT_HANDLE_INVALID)) {
			break
		}
		// Another process destroyed a key between finding it and reading its label
		// (this one cannot: tokenMu): list again.
	}
	if err != nil {
		return nil, fmt.Errorf("%w: list keys: %w", ErrToken, err)
	}
	return labels, nil
}

func (k *Keys) list() ([]string, error) {
	want := crypto11.NewAttributeSet()
	if err := want.Set(crypto11.CkaKeyType, pkcs11.CKK_EC); err != nil {
		return nil, err
	}
	privs, err := k.p11.FindPrivateKeysWithAttributes(want)
	if err != nil {
		return nil, err
	}
	labels := []string{}
	for _, p := range privs {
		a, err := k.p11.GetAttribute(p, crypto11.CkaLabel)
		if err != nil {
			return nil, err
		}
		if a != nil && strings.HasPrefix(string(a.Value), k.prefix) {
			labels = append(labels, string(a.Value))
		}
	}
	slices.Sort(labels)
	return labels, nil
}

// Close releases the token session (the keys stay in the token). It waits for
// operations in progress; afterwards every method, and Sign of every key, fails with
// ErrClosed. Close is idempotent.
func (k *Keys) Close() error {
	var err error
	k.closeOnce.Do(func() {
		k.closed.Store(true)
		// The last context on a module finalises it: see tokenMu.
		tokenMu.Lock()
		defer tokenMu.Unlock()
		if cerr := k.p11.Close(); cerr != nil {
			err = fmt.Errorf("%w: close: %w", ErrToken, cerr)
		}
	})
	return err
}

func (k *Keys) usable(ctx context.Context) error {
	if k.closed.Load() {
		return ErrClosed
	}
	return ctx.Err()
}

func setAll(set crypto11.AttributeSet, values map[crypto11.AttributeType]bool) error {
	for t, v := range values {
		if err := set.Set(t, v); err != nil {
			return err
		}
	}
	return nil
}

// Key is a private key in a token, made by Keys.NewKey. It implements crypto.Signer
// (ECDSA P-256, ASN.1 DER signatures of a digest the caller computed) for x509 and
// crypto/tls; the token signs. Safe for concurrent use.
type Key struct {
	keys  *Keys
	id    []byte // CKA_ID
	label string // CKA_LABEL

	// mu lets Destroy wait for signatures in progress, so no signature is computed
	// with a handle the token may already have given to another object.
	mu     sync.RWMutex
	signer crypto11.Signer // nil once destroyed

	pub crypto.PublicKey // immutable: read without mu
}

// Label is the key's CKA_LABEL in the token, e.g. for audit records and operators'
// tools; it is not secret.
func (k *Key) Label() string { return k.label }

// Public returns the public key, an *ecdsa.PublicKey. It stays available after Destroy.
func (k *Key) Public() crypto.PublicKey { return k.pub }

// Sign signs digest in the token. rand is ignored (the token draws its own nonce) and
// so are opts beyond what crypto/ecdsa would use. After Destroy it fails with
// ErrDestroyed, after Keys.Close with ErrClosed.
func (k *Key) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	if k.signer == nil {
		return nil, fmt.Errorf("hsm: sign with %s: %w", k.label, ErrDestroyed)
	}
	if k.keys.closed.Load() {
		return nil, fmt.Errorf("hsm: sign with %s: %w", k.label, ErrClosed)
	}
	sig, err := k.signer.Sign(nil, digest, opts)
	if err != nil {
		return nil, fmt.Errorf("%w: sign with %s: %w", ErrToken, k.label, err)
	}
	return sig, nil
}
