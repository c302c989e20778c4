package authority

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/kms/apiv1"

	"github.com/agentmesh/agentmesh/internal/atomicfile"
)

// caCerts is the CA's X.509 hierarchy: a self-signed root and one intermediate that
// signs every SVID. Both keys are in the token.
type caCerts struct {
	root, intermediate             *x509.Certificate
	rootSigner, intermediateSigner crypto.Signer
}

// caNameConstraints restricts what a CA certificate may sign to URI names in the trust
// domain. DNS and IP names stay unconstrained (no list for those types), because the
// CA's own TLS serving certificate, issued by the same intermediate, carries them; SVIDs
// are kept to exactly one URI SAN by the provisioner template instead.
func caNameConstraints(tmpl *x509.Certificate, td spiffeid.TrustDomain) {
	tmpl.PermittedURIDomains = []string{td.Name()}
	tmpl.PermittedDNSDomainsCritical = true // marks the whole name-constraints extension critical
}

// caTemplate is the template of every CA certificate: the trust domain's URI SAN and
// name constraints, certificate and CRL signing, from an hour before now.
func caTemplate(cn string, td spiffeid.TrustDomain, now, notAfter time.Time, maxPathLen int) *x509.Certificate {
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{Organization: []string{"agentmesh"}, CommonName: cn},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            maxPathLen,
		MaxPathLenZero:        maxPathLen == 0,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	caNameConstraints(tmpl, td)
	return tmpl
}

// generationSuffix tells apart the names of the certificates of generation n: none for
// the first, whose names predate rotations.
func generationSuffix(n int) string {
	if n <= 1 {
		return ""
	}
	return fmt.Sprintf(" G%d", n)
}

// createRoot makes generation n's self-signed root with the root key in the token.
func createRoot(signer crypto.Signer, td spiffeid.TrustDomain, n int, now time.Time) (*x509.Certificate, error) {
	tmpl := caTemplate("agentmesh root CA "+td.Name()+generationSuffix(n), td, now, now.Add(rootValidity), 1)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, signer.Public(), signer)
	if err != nil {
		return nil, fmt.Errorf("%w: sign root: %w", ErrHSM, err)
	}
	return x509.ParseCertificate(der)
}

// createIntermediate makes generation n's intermediate for intermediatePub, signed by
// the root key in the token. It ends with the root.
func createIntermediate(root *x509.Certificate, rootSigner crypto.Signer, intermediatePub crypto.PublicKey, td spiffeid.TrustDomain, n int, now time.Time) (*x509.Certificate, error) {
	tmpl := caTemplate("agentmesh intermediate CA "+td.Name()+generationSuffix(n), td, now, root.NotAfter, 0)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, root, intermediatePub, rootSigner)
	if err != nil {
		return nil, fmt.Errorf("%w: sign intermediate: %w", ErrHSM, err)
	}
	return x509.ParseCertificate(der)
}

// crossSign makes root (same subject, key and constraints) issued by parent with
// parent's key in the token, ending no later than either.
func crossSign(root, parent *x509.Certificate, parentSigner crypto.Signer, td spiffeid.TrustDomain, now time.Time) (*x509.Certificate, error) {
	tmpl := caTemplate(root.Subject.CommonName, td, now, root.NotAfter, root.MaxPathLen)
	tmpl.Subject = root.Subject
	tmpl.SubjectKeyId = root.SubjectKeyId
	if parent.NotAfter.Before(tmpl.NotAfter) {
		tmpl.NotAfter = parent.NotAfter
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, root.PublicKey, parentSigner)
	if err != nil {
		return nil, fmt.Errorf("%w: cross-sign root: %w", ErrHSM, err)
	}
	return x509.ParseCertificate(der)
}

// rootTrustDomain returns the trust domain named by the root's URI SAN.
func rootTrustDomain(root *x509.Certificate) (spiffeid.TrustDomain, error) {
	if len(root.URIs) != 1 {
		return spiffeid.TrustDomain{}, fmt.Errorf("root has %d URI SANs, want 1", len(root.URIs))
	}
	id, err := spiffeid.FromURI(root.URIs[0])
	if err != nil {
		return spiffeid.TrustDomain{}, fmt.Errorf("root URI SAN: %w", err)
	}
	return id.TrustDomain(), nil
}

// loadOrCreatePKI returns the root and intermediate of the state directory, creating
// whatever is missing on first start. Existing certificates must match the trust domain
// and the keys in the token.
func loadOrCreatePKI(km apiv1.KeyManager, stateDir string, td spiffeid.TrustDomain, now time.Time) (caCerts, bool, error) {
	rootPath := filepath.Join(stateDir, fileRoot)
	interPath := filepath.Join(stateDir, fileIntermediate)
	root, err := readCertFile(rootPath)
	if err != nil {
		return caCerts{}, false, err
	}
	created := root == nil

	var rootSigner crypto.Signer
	if root == nil {
		if rootSigner, err = loadOrCreateKey(km, keyURIRoot); err != nil {
			return caCerts{}, false, err
		}
		if root, err = createRoot(rootSigner, td, 1, now); err != nil {
			return caCerts{}, false, err
		}
		if err := atomicfile.Write(rootPath, pemCert(root), 0o644); err != nil {
			return caCerts{}, false, err
		}
	} else {
		if err := checkRoot(root, rootPath, td); err != nil {
			return caCerts{}, false, err
		}
		if rootSigner, err = loadMatchingKey(km, keyURIRoot, root, rootPath); err != nil {
			return caCerts{}, false, err
		}
	}

	inter, err := readCertFile(interPath)
	if err != nil {
		return caCerts{}, false, err
	}
	var interSigner crypto.Signer
	if inter == nil {
		created = true
		if interSigner, err = loadOrCreateKey(km, keyURIIntermediate); err != nil {
			return caCerts{}, false, err
		}
		if inter, err = createIntermediate(root, rootSigner, interSigner.Public(), td, 1, now); err != nil {
			return caCerts{}, false, err
		}
		if err := atomicfile.Write(interPath, pemCert(inter), 0o644); err != nil {
			return caCerts{}, false, err
		}
	} else {
		if err := inter.CheckSignatureFrom(root); err != nil {
			return caCerts{}, false, fmt.Errorf("%s is not signed by %s: %w", interPath, rootPath, err)
		}
		if interSigner, err = loadMatchingKey(km, keyURIIntermediate, inter, interPath); err != nil {
			return caCerts{}, false, err
		}
	}
	if now.After(inter.NotAfter) {
		return caCerts{}, false, fmt.Errorf("intermediate %s expired at %v", interPath, inter.NotAfter)
	}
	return caCerts{root: root, intermediate: inter, rootSigner: rootSigner, intermediateSigner: interSigner}, created, nil
}

// checkRoot refuses a root (read from path) of another trust domain than td.
func checkRoot(root *x509.Certificate, path string, td spiffeid.TrustDomain) error {
	got, err := rootTrustDomain(root)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if got != td {
		return fmt.Errorf("%w: %s is the root of %q, configured trust domain is %q",
			ErrTrustDomainMismatch, path, got.Name(), td.Name())
	}
	return nil
}

// loadMatchingKey returns the signer of the key uri, which must be the key of cert
// (read from path).
func loadMatchingKey(km apiv1.KeyManager, uri string, cert *x509.Certificate, path string) (crypto.Signer, error) {
	s, err := loadKey(km, uri)
	if err != nil {
		return nil, err
	}
	if !samePublicKey(s, cert.PublicKey) {
		return nil, fmt.Errorf("%w: key %s in the token does not match %s", ErrHSM, uri, path)
	}
	return s, nil
}

// readCertFile reads one PEM certificate; a missing file is (nil, nil).
func readCertFile(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	block, _ := pem.Decode(b)
	return parseCertBlock(path, block)
}

// parseCertBlock parses a PEM certificate block read from path.
func parseCertBlock(path string, block *pem.Block) (*x509.Certificate, error) {
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s: no PEM certificate", path)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

func pemCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func randomSerial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127)) // never fails
	return n.Add(n, big.NewInt(1))
}
