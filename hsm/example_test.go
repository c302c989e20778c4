package hsm_test

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"fmt"

	"github.com/agentmesh/agentmesh/hsm"
)

// A proxy's workload keys in an embedded SoftHSM2 token: a new key per renewal, its CSR
// signed by the token, and the key object deleted once its overlap is over. (Not run
// as a test: it needs SoftHSM2 and a directory of its own; keys_test.go does the same.)
func Example() {
	if err := renewWithTokenKey(context.Background()); err != nil {
		fmt.Println(err)
	}
}

func renewWithTokenKey(ctx context.Context) error {
	uri, release, err := hsm.SoftHSM("/var/lib/agentmesh-proxy/hsm", "agentmesh-proxy", "")
	if err != nil {
		return err
	}
	defer release() // runs after keys.Close

	keys, err := hsm.OpenKeys(ctx, uri, "svid-")
	if err != nil {
		return err
	}
	defer func() { _ = keys.Close() }()

	key, err := keys.NewKey(ctx)
	if err != nil {
		return err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return err
	}
	fmt.Printf("CSR of %d bytes signed in the token by %s\n", len(csr), key.(*hsm.Key).Label())

	// ... the certificate is issued, serves, is rotated; after its overlap and drain:
	return keys.Destroy(ctx, key)
}
