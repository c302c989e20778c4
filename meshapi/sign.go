package meshapi

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// SignRequest is step-ca's POST /1.0/sign body; rekey uses the csr field only.
type SignRequest struct {
	CSR string `json:"csr"`
	OTT string `json:"ott,omitempty"`
}

// signResponse is the part of step-ca's sign/renew/rekey answer the client reads.
type signResponse struct {
	Crt       string   `json:"crt"`
	CA        string   `json:"ca"`
	CertChain []string `json:"certChain"`
}

// ParseSignResponse returns the certificates of a step-ca sign/rekey answer, leaf
// first: certChain when present, else crt then ca.
func ParseSignResponse(b []byte) ([]*x509.Certificate, error) {
	var r signResponse
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("malformed answer: %w", err)
	}
	pems := r.CertChain
	if len(pems) == 0 {
		pems = []string{r.Crt, r.CA}
	}
	var chain []*x509.Certificate
	for _, p := range pems {
		certs, _, _, err := pemCertificates(p)
		if err != nil {
			return nil, fmt.Errorf("malformed certificate in answer: %w", err)
		}
		chain = append(chain, certs...)
	}
	if len(chain) == 0 {
		return nil, errors.New("answer holds no certificate")
	}
	return chain, nil
}

// NewCSR returns a PEM CSR for the single URI SAN id, signed by key (which may live in
// a token: only Sign is used).
func NewCSR(id spiffeid.ID, key crypto.Signer) (string, error) {
	if key == nil {
		return "", errors.New("no key")
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		URIs: []*url.URL{id.URL()},
	}, key)
	if err != nil {
		return "", fmt.Errorf("create csr: %w", err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), nil
}

// pemCertificates parses the CERTIFICATE blocks of text, in order. other are the types
// of the other blocks, passed over; rest is what follows the last block.
func pemCertificates(text string) (certs []*x509.Certificate, other []string, rest []byte, err error) {
	rest = []byte(text)
	for {
		var block *pem.Block
		if block, rest = pem.Decode(rest); block == nil {
			return certs, other, rest, nil
		}
		if block.Type != "CERTIFICATE" {
			other = append(other, block.Type)
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, nil, nil, err
		}
		certs = append(certs, c)
	}
}
