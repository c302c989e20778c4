package authority

import (
	"crypto"
	"fmt"
	"strconv"
	"time"

	"github.com/smallstep/certificates/authority/provisioner"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/jose"
)

// svidTemplate is the provisioner's X.509 template: a SPIFFE X509-SVID with exactly the
// one URI SAN that the (CA-signed) bootstrap token names, an empty subject, no DNS, IP
// or email SANs, digitalSignature, serverAuth+clientAuth, not a CA. The checks restate
// what Token guarantees, so a token minted by other means cannot widen a certificate.
// step-ca separately checks that the CSR asks for exactly the token's SANs.
const svidTemplate = `{{- if ne (len .SANs) 1 }}{{ fail "the token must name exactly one SPIFFE ID" }}{{ end }}
{{- $id := index .SANs 0 }}
{{- if ne $id.Type "uri" }}{{ fail "the token SAN must be a SPIFFE ID" }}{{ end }}
{{- if not (hasPrefix %s $id.Value) }}{{ fail "the SPIFFE ID is outside the trust domain" }}{{ end }}
{
	"subject": {},
	"uris": {{ toJson $id.Value }},
	"keyUsage": ["digitalSignature"],
	"extKeyUsage": ["serverAuth", "clientAuth"],
	"basicConstraints": {"isCA": false}
}`

// provisionerJWK is the public JWK of the provisioner key in the token, with its
// thumbprint as key ID (the "kid" header step-ca looks tokens up by).
func provisionerJWK(pub crypto.PublicKey) (*jose.JSONWebKey, error) {
	jwk := &jose.JSONWebKey{Key: pub, Algorithm: jose.ES256, Use: "sig"}
	kid, err := jose.Thumbprint(jwk)
	if err != nil {
		return nil, fmt.Errorf("provisioner key thumbprint: %w", err)
	}
	jwk.KeyID = kid
	return jwk, nil
}

// svidClaims bounds SVID lifetimes: default and maximum are the configured lifetime, the
// minimum is small enough for any lifetime New accepts. Renewal (mTLS /renew, /rekey)
// is allowed only while the certificate is valid: after expiry the workload re-enrols
// with a new token.
func svidClaims(lifetime time.Duration) *provisioner.Claims {
	no := false
	return &provisioner.Claims{
		MinTLSDur:               &provisioner.Duration{Duration: min(MinSVIDLifetime, lifetime)},
		MaxTLSDur:               &provisioner.Duration{Duration: lifetime},
		DefaultTLSDur:           &provisioner.Duration{Duration: lifetime},
		DisableRenewal:          &no,
		AllowRenewalAfterExpiry: &no,
		EnableSSHCA:             &no,
		// Keep the provisioner extension: step-ca finds the provisioner of a certificate
		// presented for renewal through it.
		DisableSmallstepExtensions: &no,
	}
}

// newProvisioner is the single JWK provisioner "agentmesh". It has no encrypted key: the
// private key is the provisioner key in the token, used only by Authority.Token.
func newProvisioner(jwk *jose.JSONWebKey, td spiffeid.TrustDomain, lifetime time.Duration) *provisioner.JWK {
	prefix := strconv.Quote(td.ID().String() + "/")
	return &provisioner.JWK{
		Type:   provisioner.TypeJWK.String(),
		Name:   provisionerName,
		Key:    jwk,
		Claims: svidClaims(lifetime),
		Options: &provisioner.Options{
			X509: &provisioner.X509Options{Template: fmt.Sprintf(svidTemplate, prefix)},
		},
	}
}
