package authority

import (
	"crypto"
	"errors"
	"fmt"

	"go.step.sm/crypto/kms/apiv1"
)

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
