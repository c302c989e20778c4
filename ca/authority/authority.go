package authority

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	stepauthority "github.com/smallstep/certificates/authority"
	"github.com/smallstep/certificates/authority/config"
	"github.com/smallstep/certificates/authority/provisioner"
	stepdb "github.com/smallstep/certificates/db"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/kms/pkcs11"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/hsm"
)

// Config configures an Authority. Every field is set by the caller (ca.Config's
// defaults apply before).
type Config struct {
	// TrustDomain is the trust domain the root names and SVIDs are issued in.
	TrustDomain spiffeid.TrustDomain
	// StateDir holds root.crt, intermediate.crt and, unless KMS is set, the SoftHSM2
	// token. It exists (the caller creates and locks it).
	StateDir string
	// KMS is the PKCS#11 URI of the token holding the keys; "" is a SoftHSM2 token in
	// StateDir, created on first start with its PIN in PINFile.
	KMS string
	// PINFile is where the embedded SoftHSM2 token's PIN is kept; "" is
	// hsm.DefaultPINFile(StateDir).
	PINFile string
	// SVIDLifetime is the lifetime of every SVID; Backdate how far before now its
	// NotBefore is set.
	SVIDLifetime, Backdate time.Duration
	// TokenLifetime is how long a bootstrap token is valid.
	TokenLifetime time.Duration
	// Logger receives step-ca's refusals and failures and the serving certificate's
	// renewals.
	Logger *slog.Logger
	// Audit receives the issuance records; nil drops them.
	Audit func(audit.Event)
	// Issued is told of every enrolment, renewal and rekey answered, as its issuance
	// record classifies it, with the time taken to answer. It must not block. Nil:
	// nothing is told.
	Issued func(action audit.IssueAction, result audit.IssueResult, took time.Duration)
}

// IssuePolicy is what the caller decides about issuance: the database step-ca stores
// certificates and used tokens in (wrap it with TokenDB so that reuses are audited),
// and the checks applied to /sign (Enforce) and to /renew and /rekey (AuthorizeRenew).
type IssuePolicy struct {
	DB             stepdb.AuthDB
	Enforce        func(*x509.Certificate) error
	AuthorizeRenew func(context.Context, *provisioner.Controller, *x509.Certificate) error
}

// Authority is step-ca's authority with its keys in a PKCS#11 token, served over
// HTTPS. Open prepares the keys and certificates, Listen binds the HTTPS listener,
// Start runs step-ca, Serve serves it; Close releases all of it. Its state is immutable
// after Listen except the serving certificate, the running step-ca, the generations of
// keys and certificates and the anchors, each an immutable snapshot behind an atomic
// pointer, so every method is safe for concurrent use once Listen has returned.
type Authority struct {
	cfg            Config
	log            *slog.Logger
	kmsURI         string
	kms            *pkcs11.PKCS11
	km             keyStore // a.kms, through which the generations' keys are managed
	releaseSoftHSM func()
	provKey        crypto.Signer
	auditKey       crypto.Signer
	provisioner    *provisioner.JWK
	created        bool // Open created the root or the intermediate
	uses           *tokenUses

	// Set by Listen.
	ln       net.Listener
	url      string
	dnsNames []string
	tokens   *tokenIssuer

	// mu serialises the changes of generations (Prepare, Activate …); readers load pki
	// and anchors, each an immutable snapshot.
	mu      sync.Mutex
	pki     atomic.Pointer[pkiState]
	anchors atomic.Pointer[anchorSet]

	db          stepdb.AuthDB // set by Start
	step        atomic.Pointer[stepauthority.Authority]
	servingCert atomic.Pointer[tls.Certificate]
}

// Open opens the token (creating the embedded SoftHSM2 token on first start), then the
// root and intermediate of cfg.StateDir, creating whatever is missing: keys generated
// inside the token, the root self-signed with name constraints to the trust domain, the
// intermediate signed by the root, the provisioner and audit keys. It fails with
// ErrTrustDomainMismatch for a state directory of another trust domain, with ErrHSM
// when a key is missing or does not match its certificate. On error it releases what
// it acquired.
func Open(ctx context.Context, cfg Config) (_ *Authority, err error) {
	a := &Authority{cfg: cfg, log: cfg.Logger, uses: newTokenUses()}
	defer func() {
		if err != nil {
			_ = a.Close(nil)
		}
	}()
	a.kmsURI = cfg.KMS
	if a.kmsURI == "" {
		// hsm.SoftHSM writes the PIN file before it creates the token: no PIN file
		// yet, where it is or where earlier versions kept it, means this start
		// creates the token.
		pinFile := cfg.PINFile
		if pinFile == "" {
			pinFile = hsm.DefaultPINFile(cfg.StateDir)
		}
		_, statErr := os.Stat(pinFile)
		if _, err := os.Stat(filepath.Join(cfg.StateDir, filePIN)); err == nil {
			statErr = nil
		}
		if a.kmsURI, a.releaseSoftHSM, err = hsm.SoftHSM(cfg.StateDir, tokenLabel, cfg.PINFile); err != nil {
			return nil, err
		}
		if errors.Is(statErr, os.ErrNotExist) {
			a.log.Info("softhsm2 token created", keyStateDir, cfg.StateDir)
		}
	}
	if a.kms, err = hsm.OpenKMS(ctx, a.kmsURI); err != nil {
		return nil, err
	}
	a.km = a.kms
	st, created, err := loadPKI(a.km, cfg.StateDir, cfg.TrustDomain, time.Now())
	if err != nil {
		return nil, err
	}
	a.created = created
	a.pki.Store(st)
	a.SetAnchors(st.roots())
	if a.provKey, err = loadOrCreateKey(a.kms, keyURIProvisioner); err != nil {
		return nil, err
	}
	if a.auditKey, err = loadOrCreateKey(a.kms, keyURIAudit); err != nil {
		return nil, err
	}
	jwk, err := provisionerJWK(a.provKey.Public())
	if err != nil {
		return nil, err
	}
	a.provisioner = newProvisioner(jwk, cfg.TrustDomain, cfg.SVIDLifetime)
	if err := checkClaims(a.provisioner); err != nil {
		return nil, err
	}
	return a, nil
}

// KMS is the redacted URI of the token (no PIN).
func (a *Authority) KMS() string { return hsm.RedactURI(a.kmsURI) }

// Created reports whether Open created the root or the intermediate.
func (a *Authority) Created() bool { return a.created }

// Root is the active generation's root. The caller may not modify it.
func (a *Authority) Root() *x509.Certificate { return a.pki.Load().active.Root }

// Intermediate is the active generation's intermediate, which signs every SVID issued
// now. The caller may not modify it.
func (a *Authority) Intermediate() *x509.Certificate { return a.pki.Load().active.Intermediate }

// IntermediateSigner signs with the active intermediate's key in the token.
func (a *Authority) IntermediateSigner() crypto.Signer {
	return a.pki.Load().active.intermediateSigner
}

// ActiveSigner is IntermediateSigner and Intermediate read together, so that a
// signature and the certificate that verifies it come from one generation even while
// Activate or Revert runs.
func (a *Authority) ActiveSigner() (crypto.Signer, *x509.Certificate) {
	g := a.pki.Load().active
	return g.intermediateSigner, g.Intermediate
}

// AuditSigner signs with the CA's audit key (ECDSA P-256, agentmesh-audit in the
// token, generated there on first use): the CA's own checkpoints and its cosignatures
// of the proxies'.
func (a *Authority) AuditSigner() crypto.Signer { return a.auditKey }

// Step is step-ca's running authority, nil before Start.
func (a *Authority) Step() *stepauthority.Authority { return a.step.Load() }

// config is step-ca's configuration for this CA. The certificate paths and the
// intermediate key URI only satisfy step-ca's validation: the certificates and the HSM
// signer are handed over as options.
func (a *Authority) config() *config.Config {
	return &config.Config{
		Root:             []string{filepath.Join(a.cfg.StateDir, fileRoot)},
		IntermediateCert: filepath.Join(a.cfg.StateDir, fileIntermediate),
		IntermediateKey:  a.pki.Load().active.IntermediateKey,
		Address:          a.ln.Addr().String(),
		DNSNames:         a.dnsNames,
		CommonName:       "agentmesh CA " + a.cfg.TrustDomain.Name(),
		AuthorityConfig: &config.AuthConfig{
			Provisioners: provisioner.List{a.provisioner},
			Backdate:     &provisioner.Duration{Duration: a.cfg.Backdate},
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

// Start builds step-ca's authority on what Open prepared, with p's database and
// checks, and issues the TLS serving certificate. It starts step-ca's CRL goroutine,
// which is why it is separate from Open; Close stops it and closes the KMS and p.DB.
// Call it once.
func (a *Authority) Start(p IssuePolicy) error {
	auth, err := stepauthority.New(a.config(),
		stepauthority.WithKeyManager(a.kms),
		stepauthority.WithX509RootCerts(a.Root()),
		// Issuance (SVIDs, renewals, the serving certificate, CRLs) follows the
		// active generation at run time; the intermediate only feeds step-ca's name
		// constraints check, which every generation shares.
		stepauthority.WithX509SignerFunc(a.activeChain),
		stepauthority.WithX509IntermediateCerts(a.Intermediate()),
		stepauthority.WithDatabase(p.DB),
		stepauthority.WithX509Enforcers(provisioner.CertificateEnforcerFunc(p.Enforce)),
		stepauthority.WithAuthorizeRenewFunc(p.AuthorizeRenew),
		stepauthority.WithQuietInit(),
	)
	if err != nil {
		return fmt.Errorf("ca: start step-ca authority: %w", err)
	}
	a.db = p.DB
	a.step.Store(auth)
	return a.issueServingCert(auth)
}

// Close releases what Open and Start acquired. step-ca's authority, once started,
// closes the KMS and the database; before Start, Close closes the KMS and calls
// closeDB (if not nil) for the database the caller opened. Call it once.
func (a *Authority) Close(closeDB func() error) error {
	var errs []error
	if a.ln != nil {
		_ = a.ln.Close()
	}
	if auth := a.step.Load(); auth != nil {
		// Closes the KMS (ending the token session) and the database.
		if err := auth.Shutdown(); err != nil {
			errs = append(errs, fmt.Errorf("stop authority: %w", err))
		}
	} else {
		if a.kms != nil {
			if err := a.kms.Close(); err != nil {
				errs = append(errs, fmt.Errorf("close kms: %w", err))
			}
		}
		if closeDB != nil {
			if err := closeDB(); err != nil {
				errs = append(errs, fmt.Errorf("close database: %w", err))
			}
		}
	}
	if a.releaseSoftHSM != nil {
		a.releaseSoftHSM()
	}
	return errors.Join(errs...)
}

// checkClaims validates the provisioner's lifetime claims as step-ca will, so a bad
// lifetime fails in Open rather than in Start.
func checkClaims(p *provisioner.JWK) error {
	if _, err := provisioner.NewClaimer(p.Claims, config.GlobalProvisionerClaims); err != nil {
		return fmt.Errorf("%w: SVIDLifetime: %w", ErrInvalidConfig, err)
	}
	return nil
}
