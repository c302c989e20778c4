package ca

import (
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/smallstep/certificates/authority"
	"github.com/smallstep/certificates/authority/config"
	"github.com/smallstep/certificates/authority/provisioner"
	"github.com/smallstep/certificates/db"
	"github.com/smallstep/certificates/errs"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/jose"

	"github.com/agentmesh/agentmesh/audit"
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
		MinTLSDur:               &provisioner.Duration{Duration: min(minSVIDLifetime, lifetime)},
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
// private key is the provisioner key in the token, used only by Server.Token.
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

// authorityConfig is step-ca's configuration for this CA. The certificate paths and
// the intermediate key URI only satisfy step-ca's validation: the certificates and the
// HSM signer are handed over as options.
func (s *Server) authorityConfig() *config.Config {
	return &config.Config{
		Root:             []string{filepath.Join(s.cfg.StateDir, fileRoot)},
		IntermediateCert: filepath.Join(s.cfg.StateDir, fileIntermediate),
		IntermediateKey:  keyURIIntermediate,
		Address:          s.ln.Addr().String(),
		DNSNames:         s.dnsNames,
		CommonName:       "agentmesh CA " + s.cfg.TrustDomain.Name(),
		AuthorityConfig: &config.AuthConfig{
			Provisioners: provisioner.List{s.provisioner},
			Backdate:     &provisioner.Duration{Duration: backdate(s.cfg.SVIDLifetime)},
			// step-ca refuses tokens issued before it started, a stop-gap for its
			// in-memory DB. Used token IDs are in the persistent database here, so a
			// token handed out just before a restart stays usable (once).
			DisableIssuedAtCheck: true,
		},
		CRL: &config.CRLConfig{
			Enabled:          true,
			GenerateOnRevoke: true,
		},
	}
}

// newAuthority builds step-ca's authority on the state New prepared. It starts step-ca's
// CRL goroutine, which is why Run, not New, calls it; authority.Shutdown stops it and
// closes the KMS and the database.
//
// Revoked identities are refused at every issuance path: /sign by an X.509 enforcer,
// /renew and /rekey by the renewal authorisation (step-ca runs enforcers on /sign
// only), and all three again when the certificate is stored (authDB), which closes the
// race with a revocation that lands while a request is in flight.
func (s *Server) newAuthority() (*authority.Authority, error) {
	return authority.New(s.authorityConfig(),
		authority.WithKeyManager(s.kms),
		authority.WithX509RootCerts(s.certs.root),
		authority.WithX509Signer(s.certs.intermediate, s.certs.intermediateSigner),
		authority.WithDatabase(s.db),
		authority.WithX509Enforcers(provisioner.CertificateEnforcerFunc(s.enforceNotRevoked)),
		authority.WithAuthorizeRenewFunc(s.authorizeRenew),
		authority.WithQuietInit(),
	)
}

// enforceNotRevoked refuses a certificate naming a revoked identity: any, until the
// identity is reinstated; afterwards one whose NotBefore is before the revocation's
// cutoff (one issued before the revocation, presented for renewal, or one requested
// with an early NotBefore). It also refuses a NotBefore later than now minus the
// backdate, which storeIssued checks again (see there why).
func (s *Server) enforceNotRevoked(cert *x509.Certificate) error {
	if bd := s.db.rev.backdate; cert.NotBefore.After(time.Now().Add(-bd)) {
		return fmt.Errorf("%w: not before %v is later than now minus the backdate %v", ErrInvalidRequest, cert.NotBefore, bd)
	}
	for _, u := range cert.URIs {
		if id, err := spiffeid.FromURI(u); err == nil && s.db.rev.revoked(id, "", cert.NotBefore) {
			return fmt.Errorf("%w: %s", ErrRevoked, id)
		}
	}
	return nil
}

// authorizeRenew is step-ca's renewal authorisation plus the revocation check: a
// certificate of a revoked identity is not renewed, even under a serial step-ca has not
// revoked (yet); the registration check: an agent identity (/agent/...) is renewed
// only while an entry names it, so unregistering stops it at the next renewal; and the
// lineage rules (lineage.go), which guardLineage applied before already for mTLS
// requests: this covers renewal tokens and a lineage that changed meanwhile.
func (s *Server) authorizeRenew(ctx context.Context, p *provisioner.Controller, cert *x509.Certificate) error {
	if err := s.enforceNotRevoked(cert); err != nil {
		return errs.ForbiddenErr(err, "certificate identity has been revoked")
	}
	if err := s.enforceRegistered(cert); err != nil {
		return errs.ForbiddenErr(err, "agent identity is not registered")
	}
	if err := s.authorizeLineage(ctx, opRenew, cert, ""); err != nil {
		if errors.Is(err, ErrRenewalRefused) {
			return errs.ForbiddenErr(err, "%s", err.Error())
		}
		return errs.InternalServerErr(err)
	}
	return provisioner.DefaultAuthorizeRenew(ctx, p, cert)
}

// authDB is step-ca's database with two changes. A used bootstrap token is recorded by
// its ID with a SHA-256 of the token as value, where step-ca stores the token itself:
// reuse detection only needs the key, and no token is kept in plain text on disk. And
// every certificate stored (issued, renewed or rekeyed) goes through the revocation
// store first, which indexes its serial under its SPIFFE ID and refuses one for a
// revoked identity; and through the lineage (lineage.go), which records its serial, host
// and the serial it replaced, and refuses one renewed from a certificate that may no
// longer renew or issued to an agent's previous host.
type authDB struct {
	*db.DB
	rev  *revocationStore
	lin  *lineageStore
	uses *tokenUses // tells the issuance audit which refusals were reuses
}

// StoreCertificateChain indexes and stores a certificate issued by /sign (step-ca
// type-asserts this method).
func (d authDB) StoreCertificateChain(p provisioner.Interface, chain ...*x509.Certificate) error {
	if len(chain) == 0 {
		return errors.New("store certificate: empty chain")
	}
	return d.lin.record(chain[0], nil, func() error {
		return d.rev.storeIssued(chain[0], func() error { return d.DB.StoreCertificateChain(p, chain...) })
	})
}

// StoreRenewedCertificate indexes and stores a certificate issued by /renew or /rekey
// (step-ca type-asserts this method).
func (d authDB) StoreRenewedCertificate(old *x509.Certificate, chain ...*x509.Certificate) error {
	if len(chain) == 0 {
		return errors.New("store certificate: empty chain")
	}
	return d.lin.record(chain[0], old, func() error {
		return d.rev.storeIssued(chain[0], func() error { return d.DB.StoreRenewedCertificate(old, chain...) })
	})
}

// UseToken marks the token ID as used; it reports false when it was used before.
func (d authDB) UseToken(id, tok string) (bool, error) {
	sum := sha256.Sum256([]byte(tok))
	ok, err := d.DB.UseToken(id, "sha256:"+hex.EncodeToString(sum[:]))
	if err == nil && !ok {
		d.uses.refusedReuse(id)
	}
	return ok, err
}

// openDB opens (creating on first start) the bbolt database in StateDir/db; entries are
// the registration entries the lineage checks agent certificates against, refused
// reports the issuances the lineage refuses at the store.
func openDB(stateDir string, entries *atomic.Pointer[entrySet], refused func(context.Context, audit.Lineage, string)) (authDB, error) {
	dir := filepath.Join(stateDir, dirDB)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return authDB{}, fmt.Errorf("create database directory: %w", err)
	}
	path := filepath.Join(dir, fileDB)
	d, err := db.New(&db.Config{Type: "bbolt", DataSource: path})
	if err != nil {
		return authDB{}, fmt.Errorf("open database %s: %w", path, err)
	}
	sdb, ok := d.(*db.DB)
	if !ok {
		_ = d.Shutdown()
		return authDB{}, fmt.Errorf("open database %s: unexpected type %T", path, d)
	}
	rev, err := openRevocationStore(sdb)
	if err != nil {
		_ = sdb.Shutdown()
		return authDB{}, fmt.Errorf("open database %s: %w", path, err)
	}
	lin, err := openLineageStore(sdb, rev, entries, refused)
	if err != nil {
		_ = sdb.Shutdown()
		return authDB{}, fmt.Errorf("open database %s: %w", path, err)
	}
	return authDB{DB: sdb, rev: rev, lin: lin, uses: newTokenUses()}, nil
}
