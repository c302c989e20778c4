package ca

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/smallstep/certificates/authority/provisioner"
	"github.com/smallstep/certificates/db"
	"github.com/smallstep/certificates/errs"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/ca/authority"
)

// The issuance policy the CA hands step-ca's authority (authority.IssuePolicy): revoked
// identities are refused at every issuance path: /sign by an X.509 enforcer, /renew
// and /rekey by the renewal authorisation (step-ca runs enforcers on /sign only), and
// all three again when the certificate is stored (authDB), which closes the race with
// a revocation that lands while a request is in flight.

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
// authority.UseToken (as a SHA-256, its reuse audited). And every certificate stored (issued, renewed or rekeyed) goes through the revocation
// store first, which indexes its serial under its SPIFFE ID and refuses one for a
// revoked identity; and through the lineage (lineage.go), which records its serial, host
// and the serial it replaced, and refuses one renewed from a certificate that may no
// longer renew or issued to an agent's previous host.
type authDB struct {
	*db.DB
	rev  *revocationStore
	lin  *lineageStore
	auth *authority.Authority // records used tokens and tells the issuance audit of reuses
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
	return d.auth.UseToken(id, tok, d.DB.UseToken)
}

// openDB opens (creating on first start) the bbolt database in StateDir/db; entries are
// auth records used tokens; entries are the registration entries the lineage checks agent certificates against, refused
// reports the issuances the lineage refuses at the store.
func openDB(stateDir string, auth *authority.Authority, entries *atomic.Pointer[entrySet], refused func(context.Context, audit.Lineage, string)) (authDB, error) {
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
	return authDB{DB: sdb, rev: rev, lin: lin, auth: auth}, nil
}
