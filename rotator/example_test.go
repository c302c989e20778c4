package rotator_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"time"

	"github.com/agentmesh/agentmesh/policy"
	"github.com/agentmesh/agentmesh/rotator"
)

// A one-hour SVID with the default policy renews when a third of its lifetime remains,
// brought forward by a jitter draw of 0.5 times a twentieth of the lifetime.
func ExampleRenewAt() {
	notBefore := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := rotator.RenewAt(notBefore, notBefore.Add(time.Hour), policy.RotationPolicy{}.WithDefaults(), 0.5)
	fmt.Println(at.Sub(notBefore))
	// Output: 38m30s
}

// Once destroyed, a key refuses to sign.
func ExampleMemoryKeys() {
	ctx := context.Background()
	keys := rotator.MemoryKeys{}
	key, err := keys.NewKey(ctx)
	if err != nil {
		panic(err)
	}
	digest := sha256.Sum256([]byte("handshake transcript"))
	_, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
	fmt.Println("before:", err)
	if err := keys.Destroy(ctx, key); err != nil {
		panic(err)
	}
	_, err = key.Sign(rand.Reader, digest[:], crypto.SHA256)
	fmt.Println("after:", errors.Is(err, rotator.ErrKeyDestroyed))
	// Output:
	// before: <nil>
	// after: true
}
