package svidrules

import (
	"bytes"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
)

// MaxIDLength is the longest SPIFFE ID accepted, in bytes: the limit of the SPIFFE
// specification (SPIFFE-ID section 2.3). A longer one is refused before it reaches
// policy, a log line or a backend.
const MaxIDLength = 2048

// DefaultMaxIntermediates is how many intermediates a chain may carry by default: the
// mesh's CA issues every SVID from one intermediate under its root.
const DefaultMaxIntermediates = 1

// MaxIntermediatesLimit is the largest value a configuration may allow: enough for a
// chain through a cross-signed root during an anchor rotation, small enough to bound
// the signature work a peer can ask of a handshake.
const MaxIntermediatesLimit = 4

// Role is what the peer is in the TLS connection: the side that verifies a client
// requires clientAuth, the side that verifies a server requires serverAuth.
type Role int

const (
	// Client is a peer that connected (an inbound tunnel, a request to the CA).
	Client Role = iota + 1
	// Server is a peer that was connected to (an outbound tunnel).
	Server
)

func (r Role) String() string {
	switch r {
	case Client:
		return "client"
	case Server:
		return "server"
	}
	return fmt.Sprintf("Role(%d)", int(r))
}

// Rule names the rule a certificate broke. Stable identifiers.
type Rule string

const (
	// RuleKeyUsage: the leaf has an extended key usage without the one its role needs
	// (clientAuth for a client, serverAuth for a server).
	RuleKeyUsage Rule = "key_usage"
	// RuleChainDepth: the chain carries more intermediates than allowed.
	RuleChainDepth Rule = "chain_depth"
	// RuleIDLength: a URI SAN of the leaf is longer than MaxIDLength.
	RuleIDLength Rule = "id_length"
	// RuleDigitalSignature: the leaf lacks the digitalSignature key usage, which an
	// X509-SVID must carry (SPIFFE X509-SVID section 4.3) and which a TLS 1.3
	// CertificateVerify needs.
	RuleDigitalSignature Rule = "digital_signature"
)

// ErrViolation is wrapped by every *ViolationError.
var ErrViolation = errors.New("certificate rule violated")

// ViolationError says which rule a certificate broke and how.
type ViolationError struct {
	Rule   Rule
	Detail string
}

func (e *ViolationError) Error() string {
	return fmt.Sprintf("%s (%s): %s", ErrViolation, e.Rule, e.Detail)
}

func (e *ViolationError) Unwrap() error { return ErrViolation }

// CheckLeaf applies the leaf rules for a peer of role r: the SPIFFE ID length, the
// digitalSignature key usage (required, present or not the extension: x509svid.Verify
// does not check it), and, when the leaf has an extended key usage extension, the usage
// of its role. A leaf without that extension may be used for any purpose (RFC 5280
// section 4.2.1.12), as crypto/tls treats it.
func CheckLeaf(leaf *x509.Certificate, r Role) error {
	for _, u := range leaf.URIs {
		if n := len(u.String()); n > MaxIDLength {
			return &ViolationError{Rule: RuleIDLength,
				Detail: fmt.Sprintf("URI SAN of %d bytes, the limit is %d", n, MaxIDLength)}
		}
	}
	if leaf.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
		return &ViolationError{Rule: RuleDigitalSignature,
			Detail: "an X509-SVID leaf needs the digitalSignature key usage"}
	}
	if len(leaf.ExtKeyUsage) == 0 && len(leaf.UnknownExtKeyUsage) == 0 {
		return nil
	}
	want := x509.ExtKeyUsageClientAuth
	if r == Server {
		want = x509.ExtKeyUsageServerAuth
	}
	if slices.Contains(leaf.ExtKeyUsage, want) || slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageAny) {
		return nil
	}
	name := "clientAuth"
	if r == Server {
		name = "serverAuth"
	}
	return &ViolationError{Rule: RuleKeyUsage,
		Detail: fmt.Sprintf("a %s leaf needs the %s extended key usage", r, name)}
}

// CheckDepth refuses a presented chain (leaf first) that carries more than limit
// intermediates. A trust anchor the peer sends along is not counted: it adds no link
// the verifier would not have anyway.
func CheckDepth(chain, anchors []*x509.Certificate, limit int) error {
	n := 0
	for _, c := range chain[min(1, len(chain)):] {
		if !slices.ContainsFunc(anchors, func(a *x509.Certificate) bool { return bytes.Equal(a.Raw, c.Raw) }) {
			n++
		}
	}
	if n > limit {
		return &ViolationError{Rule: RuleChainDepth,
			Detail: fmt.Sprintf("%d intermediates, at most %d allowed", n, limit)}
	}
	return nil
}

// KeyFingerprint names a certificate's key: the hex SHA-256 of its
// SubjectPublicKeyInfo. A certificate is issued by the CA certificate whose
// KeyFingerprint is that of its chain[1].
func KeyFingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(sum[:])
}
