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
	root, intermediate *x509.Certificate
	intermediateSigner crypto.Signer
}

// caNameConstraints restricts what a CA certificate may sign to URI names in the trust
// domain. DNS and IP names stay unconstrained (no list for those types), because the
// CA's own TLS serving certificate, issued by the same intermediate, carries them; SVIDs
// are kept to exactly one URI SAN by the provisioner template instead.
func caNameConstraints(tmpl *x509.Certificate, td spiffeid.TrustDomain) {
	tmpl.PermittedURIDomains = []string{td.Name()}
	tmpl.PermittedDNSDomainsCritical = true // marks the whole name-constraints extension critical
}

// createRoot makes the self-signed root with the root key in the token.
func createRoot(signer crypto.Signer, td spiffeid.TrustDomain, now time.Time) (*x509.Certificate, error) {
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{Organization: []string{"agentmesh"}, CommonName: "agentmesh root CA " + td.Name()},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(rootValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            1,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	caNameConstraints(tmpl, td)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, signer.Public(), signer)
	if err != nil {
		return nil, fmt.Errorf("%w: sign root: %w", ErrHSM, err)
	}
	return x509.ParseCertificate(der)
}

// createIntermediate makes the intermediate for intermediatePub, signed by the root key
// in the token. It ends with the root.
func createIntermediate(root *x509.Certificate, rootSigner crypto.Signer, intermediatePub crypto.PublicKey, td spiffeid.TrustDomain, now time.Time) (*x509.Certificate, error) {
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{Organization: []string{"agentmesh"}, CommonName: "agentmesh intermediate CA " + td.Name()},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              root.NotAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	caNameConstraints(tmpl, td)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, root, intermediatePub, rootSigner)
	if err != nil {
		return nil, fmt.Errorf("%w: sign intermediate: %w", ErrHSM, err)
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
		if root, err = createRoot(rootSigner, td, now); err != nil {
			return caCerts{}, false, err
		}
		if err := atomicfile.Write(rootPath, pemCert(root), 0o644); err != nil {
			return caCerts{}, false, err
		}
	} else {
		got, err := rootTrustDomain(root)
		if err != nil {
			return caCerts{}, false, fmt.Errorf("%s: %w", rootPath, err)
		}
		if got != td {
			return caCerts{}, false, fmt.Errorf("%w: %s is the root of %q, configured trust domain is %q",
				ErrTrustDomainMismatch, rootPath, got.Name(), td.Name())
		}
		if rootSigner, err = loadKey(km, keyURIRoot); err != nil {
			return caCerts{}, false, err
		}
		if !samePublicKey(rootSigner, root.PublicKey) {
			return caCerts{}, false, fmt.Errorf("%w: root key in the token does not match %s", ErrHSM, rootPath)
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
		if inter, err = createIntermediate(root, rootSigner, interSigner.Public(), td, now); err != nil {
			return caCerts{}, false, err
		}
		if err := atomicfile.Write(interPath, pemCert(inter), 0o644); err != nil {
			return caCerts{}, false, err
		}
	} else {
		if err := inter.CheckSignatureFrom(root); err != nil {
			return caCerts{}, false, fmt.Errorf("%s is not signed by %s: %w", interPath, rootPath, err)
		}
		if interSigner, err = loadKey(km, keyURIIntermediate); err != nil {
			return caCerts{}, false, err
		}
		if !samePublicKey(interSigner, inter.PublicKey) {
			return caCerts{}, false, fmt.Errorf("%w: intermediate key in the token does not match %s", ErrHSM, interPath)
		}
	}
	if now.After(inter.NotAfter) {
		return caCerts{}, false, fmt.Errorf("intermediate %s expired at %v", interPath, inter.NotAfter)
	}
	return caCerts{root: root, intermediate: inter, intermediateSigner: interSigner}, created, nil
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
