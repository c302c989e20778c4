package authority

import (
	"crypto"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/jose"

	"github.com/agentmesh/agentmesh/meshapi"
)

// tokenClaims is the payload of a JWK provisioner one-time token as step-ca reads it.
type tokenClaims struct {
	jose.Claims
	SANs []string `json:"sans"`
	// SHA is the root's fingerprint, which the step CLI uses to bootstrap trust from
	// a token; agentmesh clients are given the root directly.
	SHA string `json:"sha,omitempty"`
}

// tokenIssuer mints bootstrap tokens signed by the provisioner key in the token. It is
// immutable and safe for concurrent use; the PKCS#11 KMS serialises the signatures.
type tokenIssuer struct {
	td       spiffeid.TrustDomain
	signer   jose.Signer
	audience string        // https://<first DNS name>:<port>/1.0/sign
	rootSHA  func() string // the active root's fingerprint
	lifetime time.Duration
}

func newTokenIssuer(td spiffeid.TrustDomain, key crypto.Signer, kid, audience string, rootSHA func() string, lifetime time.Duration) (*tokenIssuer, error) {
	signer, err := jose.NewSigner(
		jose.SigningKey{Algorithm: jose.ES256, Key: jose.NewOpaqueSigner(key)},
		new(jose.SignerOptions).WithType("JWT").WithHeader("kid", kid),
	)
	if err != nil {
		return nil, fmt.Errorf("token signer: %w", err)
	}
	return &tokenIssuer{td: td, signer: signer, audience: audience, rootSHA: rootSHA, lifetime: lifetime}, nil
}

// CheckIssuable returns ErrInvalidID unless id is a workload ID in td of at most
// svidrules.MaxIDLength bytes.
func CheckIssuable(td spiffeid.TrustDomain, id spiffeid.ID) error {
	return meshapi.CheckWorkloadID(td, id)
}

// issue returns a one-time token for id valid from now: sub = sans[0] = id, a random
// 256-bit jti (step-ca records used IDs in its database, so a token enrols once).
func (t *tokenIssuer) issue(id spiffeid.ID, now time.Time) (string, time.Time, error) {
	if err := CheckIssuable(t.td, id); err != nil {
		return "", time.Time{}, err
	}
	jti := make([]byte, 32)
	_, _ = rand.Read(jti) // crypto/rand.Read never fails (Go 1.24+)
	exp := now.Add(t.lifetime)
	claims := tokenClaims{
		Claims: jose.Claims{
			ID:        hex.EncodeToString(jti),
			Issuer:    provisionerName,
			Subject:   id.String(),
			Audience:  jose.Audience{t.audience},
			NotBefore: jose.NewNumericDate(now),
			IssuedAt:  jose.NewNumericDate(now),
			Expiry:    jose.NewNumericDate(exp),
		},
		SANs: []string{id.String()},
		SHA:  t.rootSHA(),
	}
	tok, err := jose.Signed(t.signer).Claims(claims).CompactSerialize()
	if err != nil {
		return "", time.Time{}, fmt.Errorf("ca: %w: sign token: %w", ErrHSM, err)
	}
	return tok, exp, nil
}

// Token returns a one-time bootstrap token that enrols exactly id (a SPIFFE ID with a
// path in the trust domain) once, and when it expires. It is signed by the provisioner
// key inside the token. It fails with ErrInvalidID or ErrHSM.
func (a *Authority) Token(id spiffeid.ID) (string, time.Time, error) {
	return a.tokens.issue(id, time.Now())
}
