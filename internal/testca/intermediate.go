package testca

import (
	"crypto"
	"crypto/x509"
)

// Intermediate returns the intermediate certificate and its key, for tests that
// sign with the CA something other than an SVID: a server certificate with DNS or IP
// SANs, or a document the CA signs (such as a revocation deny-list).
func (c *CA) Intermediate() (*x509.Certificate, crypto.Signer) { return c.inter, c.interKey }
