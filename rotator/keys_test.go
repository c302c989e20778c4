package rotator

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"math/big"
	"net"
	"slices"
	"sync"
	"testing"

	"github.com/agentmesh/agentmesh/internal/testca"
)

func newMemoryKey(t *testing.T) *memoryKey {
	t.Helper()
	k, err := MemoryKeys{}.NewKey(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	mk, ok := k.(*memoryKey)
	if !ok {
		t.Fatalf("NewKey returned %T", k)
	}
	return mk
}

func TestMemoryKeysSign(t *testing.T) {
	t.Parallel()
	k := newMemoryKey(t)
	pub, ok := k.Public().(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Fatalf("public key %T, want ECDSA P-256", k.Public())
	}
	other := newMemoryKey(t)
	if pub.Equal(other.Public()) {
		t.Fatal("two keys share a public key")
	}
	digest := sha256.Sum256([]byte("agentmesh"))
	sig, err := k.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if !ecdsa.VerifyASN1(pub, digest[:], sig) {
		t.Fatal("signature does not verify")
	}
}

func TestMemoryKeysDestroyOverwritesScalar(t *testing.T) {
	t.Parallel()
	k := newMemoryKey(t)
	d := k.priv.D     //nolint:staticcheck // SA1019: the test checks the scalar is cleared in place
	words := d.Bits() // aliases the scalar's storage
	if !slices.ContainsFunc(words, func(w big.Word) bool { return w != 0 }) {
		t.Fatal("fresh key has an all-zero scalar")
	}
	if err := (MemoryKeys{}).Destroy(t.Context(), k); err != nil {
		t.Fatal(err)
	}
	for i, w := range words[:cap(words)] {
		if w != 0 {
			t.Fatalf("scalar word %d not overwritten", i)
		}
	}
	if d.Sign() != 0 {
		t.Fatalf("scalar = %v after Destroy, want 0", d)
	}
	digest := sha256.Sum256([]byte("agentmesh"))
	if _, err := k.Sign(rand.Reader, digest[:], crypto.SHA256); !errors.Is(err, ErrKeyDestroyed) {
		t.Fatalf("Sign after Destroy: err = %v, want ErrKeyDestroyed", err)
	}
	// A stray reference to the ecdsa key refuses to sign too.
	stray := &ecdsa.PrivateKey{PublicKey: *k.pub, D: d} //nolint:staticcheck // SA1019: a stray reference, as Destroy must defeat
	if _, err := stray.Sign(rand.Reader, digest[:], crypto.SHA256); err == nil {
		t.Fatal("the overwritten ecdsa key still signs")
	}
	if k.Public() == nil {
		t.Fatal("the public half is gone")
	}
	if err := (MemoryKeys{}).Destroy(t.Context(), k); err != nil {
		t.Fatalf("second Destroy: %v", err)
	}
}

func TestMemoryKeysDestroyForeignKey(t *testing.T) {
	t.Parallel()
	foreign, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if err := (MemoryKeys{}).Destroy(t.Context(), foreign); err == nil {
		t.Fatal("Destroy of a key MemoryKeys did not make succeeded")
	}
	if foreign.D.Sign() == 0 { //nolint:staticcheck // SA1019: only D shows the scalar was left alone
		t.Fatal("a foreign key was overwritten")
	}
}

// TestMemoryKeysDestroyWhileSigning runs signatures concurrently with Destroy (under
// -race): each either succeeds with a valid signature or fails with ErrKeyDestroyed.
func TestMemoryKeysDestroyWhileSigning(t *testing.T) {
	t.Parallel()
	k := newMemoryKey(t)
	pub := k.pub
	digest := sha256.Sum256([]byte("agentmesh"))
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range 8 {
		wg.Go(func() {
			<-start
			for range 50 {
				sig, err := k.Sign(rand.Reader, digest[:], crypto.SHA256)
				switch {
				case errors.Is(err, ErrKeyDestroyed):
					return
				case err != nil:
					t.Errorf("Sign: %v", err)
					return
				case !ecdsa.VerifyASN1(pub, digest[:], sig):
					t.Error("invalid signature while destroying")
					return
				}
			}
		})
	}
	close(start)
	if err := (MemoryKeys{}).Destroy(context.Background(), k); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
}

// TestMemoryKeyInTLS completes real TLS 1.3 handshakes with a MemoryKeys key as the
// server's certificate key (crypto/tls takes it as a crypto.Signer), and checks that
// once it is destroyed a handshake can no longer be signed with it.
func TestMemoryKeyInTLS(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	k := newMemoryKey(t)
	certs := ca.Issue(t, hostA, k.Public())
	cert := tls.Certificate{Certificate: [][]byte{certs[0].Raw, certs[1].Raw}, PrivateKey: k, Leaf: certs[0]}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Roots()[0])

	handshake := func() error {
		c, s := net.Pipe()
		defer c.Close()
		defer s.Close()
		server := tls.Server(s, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})
		// SVIDs carry no DNS name, so the usual hostname check cannot apply; the chain
		// is verified against the test CA in VerifyConnection instead.
		client := tls.Client(c, &tls.Config{
			MinVersion:         tls.VersionTLS13,
			InsecureSkipVerify: true, //nolint:gosec,forbidigo // chain verified in VerifyConnection
			VerifyConnection: func(cs tls.ConnectionState) error {
				inter := x509.NewCertPool()
				inter.AddCert(cs.PeerCertificates[1])
				_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter})
				return err
			},
		})
		// Each side closes its end as soon as its handshake returns, so a side that
		// failed never leaves the other blocked on the unbuffered pipe.
		errs := make(chan error, 1)
		go func() {
			err := server.HandshakeContext(t.Context())
			s.Close()
			errs <- err
		}()
		cerr := client.HandshakeContext(t.Context())
		c.Close()
		serr := <-errs
		return errors.Join(cerr, serr)
	}
	if err := handshake(); err != nil {
		t.Fatalf("handshake with a memory key: %v", err)
	}
	if err := (MemoryKeys{}).Destroy(t.Context(), k); err != nil {
		t.Fatal(err)
	}
	// crypto/tls reports the signer's error as text only (%v), so only the failure
	// itself can be asserted here; Sign's ErrKeyDestroyed is checked directly above.
	if err := handshake(); err == nil {
		t.Fatal("handshake signed with a destroyed key succeeded")
	}
}
