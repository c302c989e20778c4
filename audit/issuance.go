package audit

import "time"

// IssueAction is what a CA issuance record is about.
type IssueAction string

const (
	// ActionToken: a one-time bootstrap token was asked for.
	ActionToken IssueAction = "token"
	// ActionEnroll: a certificate was asked for with a bootstrap token (/sign).
	ActionEnroll IssueAction = "enroll"
	// ActionRenew: a certificate was renewed with the same key (/renew), by presenting it.
	ActionRenew IssueAction = "renew"
	// ActionRekey: a certificate was renewed with a new key (/rekey), by presenting it.
	ActionRekey IssueAction = "rekey"
)

// IssueResult is the outcome of an issuance request.
type IssueResult string

const (
	IssueOK      IssueResult = "ok"      // issued
	IssueRefused IssueResult = "refused" // the request was not allowed or not valid
	IssueError   IssueResult = "error"   // the CA failed (HSM, database)
)

// IssueReason says why an issuance request was refused.
type IssueReason string

const (
	// ReasonTokenReused: the bootstrap token had enrolled before (single use).
	ReasonTokenReused IssueReason = "token_reused"
	// ReasonTokenInvalid: the bootstrap token is malformed, badly signed, expired or
	// for another audience.
	ReasonTokenInvalid IssueReason = "token_invalid"
	// ReasonCertificateInvalid: the certificate presented is expired or revoked, does
	// not chain to the CA for client authentication, or breaks a certificate rule (key
	// usage, chain depth, SPIFFE ID length).
	ReasonCertificateInvalid IssueReason = "certificate_invalid"
	// ReasonNotAllowed: an authorised request the CA's rules refuse: a revoked or
	// unregistered identity, a caller that may not ask for it, a request outside the
	// template.
	ReasonNotAllowed IssueReason = "not_allowed"
	// ReasonBadRequest: the request is malformed (body, CSR, SPIFFE ID).
	ReasonBadRequest IssueReason = "bad_request"
)

// Issuance records one request to the CA for a bootstrap token or a certificate, and
// what came of it. It never holds a token or a key: a token is named by the SHA-256
// of its ID (TokenID), which links an enrolment to the token's issuance.
type Issuance struct {
	Action IssueAction `json:"action"`
	Result IssueResult `json:"result"`
	Reason IssueReason `json:"reason,omitempty"`
	// Actor is who asked: "uid:N" on the admin socket; the SPIFFE ID and serial of the
	// certificate presented over mTLS (a token over the mesh API, a renewal); "token"
	// for an enrolment, whose caller is the bearer of the token TokenID names.
	Actor
	// PeerAddr is the caller's network address (HTTPS API).
	PeerAddr string `json:"peer_addr,omitempty"`
	// SPIFFEID is the identity the token or certificate is (or was asked) for.
	SPIFFEID string `json:"spiffe_id,omitempty"`
	// Host is the host a token for an agent was asked for by (its registration's).
	Host string `json:"host,omitempty"`
	// TokenID is the SHA-256 (hex) of the token's ID (its jti).
	TokenID string `json:"token_id,omitempty"`
	// Serial and NotAfter describe the certificate issued.
	Serial   string    `json:"serial,omitempty"`
	NotAfter time.Time `json:"not_after,omitzero"`
	Error    string    `json:"error,omitempty"`
}

// Kind returns "issuance".
func (Issuance) Kind() string { return "issuance" }

// BundleResult is the outcome of a trust-bundle change.
type BundleResult string

const (
	BundleApplied BundleResult = "applied" // the new anchors are in force
	BundleRefused BundleResult = "refused" // the new bundle was not usable; the old one stays
)

// TrustBundle records a change of the trust anchors a proxy verifies its peers and
// its CA against (an authority added to or removed from the bundle), or a bundle it
// refused. Anchors are named by the SHA-256 (hex) of their DER certificate.
type TrustBundle struct {
	SPIFFEID    string       `json:"spiffe_id"` // the identity whose bundle changed
	TrustDomain string       `json:"trust_domain"`
	Result      BundleResult `json:"result"`
	Error       string       `json:"error,omitempty"`
	// Version names the anchors in force afterwards, Previous those before: a digest
	// of the anchor set, as the directory shows it (bundle_version).
	Version  string `json:"version"`
	Previous string `json:"previous,omitempty"`
	// Old and New are the anchors before and after; Added and Removed their
	// difference.
	Old     []string `json:"old_anchors"`
	New     []string `json:"new_anchors"`
	Added   []string `json:"added,omitempty"`
	Removed []string `json:"removed,omitempty"`
}

// Kind returns "bundle".
func (TrustBundle) Kind() string { return "bundle" }
