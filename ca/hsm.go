package ca

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"net/url"
	"strings"

	"go.step.sm/crypto/kms/apiv1"
	"go.step.sm/crypto/kms/pkcs11" // registers the "pkcs11" KMS type; needs cgo
)

// openKMS opens the PKCS#11 token named by uri. Neither step-ca's authority nor its ca
// package imports the pkcs11 KMS, so without this package's import (and cgo) the KMS
// type would be unknown and fail only at run time.
func openKMS(ctx context.Context, uri string) (*pkcs11.PKCS11, error) {
	km, err := pkcs11.New(ctx, apiv1.Options{Type: apiv1.PKCS11, URI: uri})
	if err != nil {
		return nil, fmt.Errorf("%w: open token %s: %w", ErrHSM, redactKMSURI(uri), err)
	}
	return km, nil
}

// loadKey returns the signer of an existing key in the token.
func loadKey(km apiv1.KeyManager, name string) (crypto.Signer, error) {
	s, err := km.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: name})
	if err != nil {
		return nil, fmt.Errorf("%w: key %s: %w", ErrHSM, name, err)
	}
	return s, nil
}

// loadOrCreateKey returns the signer of the key called name, generating it inside the
// token (ECDSA P-256, sensitive, never extractable) when it does not exist yet. A key
// that exists is reused: a first start interrupted after key generation resumes with it.
func loadOrCreateKey(km apiv1.KeyManager, name string) (crypto.Signer, error) {
	_, err := km.CreateKey(&apiv1.CreateKeyRequest{
		Name:               name,
		SignatureAlgorithm: apiv1.ECDSAWithSHA256,
		// Extractable stays false: the private key never leaves the token.
	})
	var exists apiv1.AlreadyExistsError
	if err != nil && !errors.As(err, &exists) {
		return nil, fmt.Errorf("%w: generate key %s: %w", ErrHSM, name, err)
	}
	return loadKey(km, name)
}

// samePublicKey reports whether the signer's public key is pub.
func samePublicKey(s crypto.Signer, pub crypto.PublicKey) bool {
	k, ok := s.Public().(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(pub)
}

// redactKMSURI drops a pin-value from a PKCS#11 URI so it can appear in errors and logs.
func redactKMSURI(uri string) string {
	u, err := url.Parse(uri)
	if err != nil {
		return "<unparsable pkcs11 uri>"
	}
	opaque := strings.Split(u.Opaque, ";")
	for i, kv := range opaque {
		if strings.HasPrefix(kv, "pin-value=") {
			opaque[i] = "pin-value=REDACTED"
		}
	}
	u.Opaque = strings.Join(opaque, ";")
	if q := u.Query(); q.Has("pin-value") {
		q.Set("pin-value", "REDACTED")
		u.RawQuery = q.Encode()
	}
	return u.String()
}
