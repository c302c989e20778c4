package rotator

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"fmt"
	"io"
	"sync"
)

// KeyStore makes and destroys the private keys of SVIDs. Every rotation gets a new key.
// Both methods may do I/O (an HSM) and are called from the rotator's own goroutines,
// never concurrently for the same key.
type KeyStore interface {
	// NewKey makes a new private key. The rotator never persists it.
	NewKey(ctx context.Context) (crypto.Signer, error)
	// Destroy deletes the key for good (an HSM object is deleted; an in-memory key is
	// overwritten as far as Go allows). Called once, after the key's overlap and drain,
	// or at once for the key of a failed attempt. Signing with a destroyed key must
	// fail rather than succeed with what is left of it.
	Destroy(ctx context.Context, key crypto.Signer) error
}

// MemoryKeys is the default KeyStore: ECDSA P-256 keys in process memory; Destroy
// overwrites the private scalar.
//
// What that does and does not guarantee. Destroy zeroes the words of the big.Int that
// holds the scalar (ecdsa.PrivateKey.D), drops the key's last reference held here, and
// makes every later Sign with it fail. Go gives no control over memory beyond that, so
// copies of the scalar may survive in places this code cannot reach:
//   - crypto/ecdsa keeps a precomputed internal form of the key, with its own copy of
//     the scalar, in a cache evicted only some time after the ecdsa.PrivateKey becomes
//     unreachable and a garbage collection has run; generating the key and signing
//     also leave copies in temporary buffers and stack frames freed without clearing;
//   - Go's heap does not move objects, but freed memory keeps its contents until it is
//     reused, and a goroutine stack that grows is copied and the old copy left behind;
//   - registers, and pages the kernel swapped to disk or wrote into a core dump.
//
// Run the proxy with swap off (or encrypted) and core dumps disabled, and use a
// PKCS#11 KeyStore where keys must never be in process memory at all.
type MemoryKeys struct{}

// NewKey generates an ECDSA P-256 key with crypto/rand.
func (MemoryKeys) NewKey(context.Context) (crypto.Signer, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
	if err != nil {
		return nil, fmt.Errorf("rotator: generate key: %w", err)
	}
	return &memoryKey{priv: k, pub: &k.PublicKey}, nil
}

// Destroy overwrites the private scalar of a key NewKey made. Destroying a key twice is
// harmless; a key from elsewhere is an error and is left alone.
func (MemoryKeys) Destroy(_ context.Context, key crypto.Signer) error {
	k, ok := key.(*memoryKey)
	if !ok {
		return fmt.Errorf("rotator: destroy: %T was not made by MemoryKeys", key)
	}
	k.destroy()
	return nil
}

// memoryKey wraps the ecdsa key so that Destroy cannot race a signature in flight (a
// handshake that read the certificate just before its credential was dropped): Sign
// holds the read lock, destroy the write lock, and a destroyed key refuses to sign.
type memoryKey struct {
	pub *ecdsa.PublicKey // immutable, so Public needs no lock

	mu   sync.RWMutex
	priv *ecdsa.PrivateKey // nil once destroyed
}

func (k *memoryKey) Public() crypto.PublicKey { return k.pub }

func (k *memoryKey) Sign(rand io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	if k.priv == nil {
		return nil, ErrKeyDestroyed
	}
	return k.priv.Sign(rand, digest, opts)
}

func (k *memoryKey) destroy() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.priv == nil {
		return
	}
	// D is deprecated for reading and writing key material, but it is where the scalar
	// lives and nothing else reaches those words: Bits aliases them, so clearing the
	// slice clears the scalar in place. Setting D to zero afterwards also makes
	// crypto/ecdsa refuse the key should a stray reference to it be used.
	d := k.priv.D //nolint:staticcheck // SA1019: see above
	clear(d.Bits())
	d.SetInt64(0)
	k.priv = nil
}
