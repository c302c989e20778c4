package meshapi

import "time"

// The CA's fleet view (docs/status-page.md). Each proxy reports its own state with every
// heartbeat (RegisterRequest.Status); the CA keeps the latest per host, out of the
// directory (peers never see it), and builds from it, its revocations, its rotation and
// its witness the status page's document.

// ProxyStatus is what a proxy reports of itself with a heartbeat.
type ProxyStatus struct {
	// Version is the agentmesh build the proxy runs.
	Version string `json:"version"`
	// Ready and NotReady are the proxy's /readyz.
	Ready    bool   `json:"ready"`
	NotReady string `json:"not_ready,omitempty"`
	// Identities are those the proxy holds: its host's first, then its agents'.
	Identities []IdentityStatus `json:"identities"`
}

// IdentityStatus is one identity a proxy holds.
type IdentityStatus struct {
	SPIFFEID string    `json:"spiffe_id"`
	Ready    bool      `json:"ready"`
	Error    string    `json:"error,omitempty"`
	RenewAt  time.Time `json:"renew_at,omitzero"`
	// Keys: the current key first, then those in overlap, then retired ones (newest
	// first), as the proxy's rotator reports them.
	Keys []KeyStatus `json:"keys"`
}

// KeyStatus is one key of an identity and its certificate.
type KeyStatus struct {
	Version uint64 `json:"version"`
	Serial  string `json:"serial"`
	// State is "active", "overlap", "compromised" or "destroyed" (audit.KeyPhase);
	// Since when it entered it, Cause why.
	State     string    `json:"state"`
	Cause     string    `json:"cause,omitempty"`
	Since     time.Time `json:"since"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
}

// MaxProxyStatusIdentities bounds the identities one heartbeat reports (the rest are
// left out, and the page says so).
const MaxProxyStatusIdentities = 256

// Bounds of the fields of a ProxyStatus; texts are printable ASCII. The proxy cuts what
// it reports to them: the CA drops a status beyond them whole.
const (
	MaxStatusVersion = 64  // ProxyStatus.Version
	MaxStatusText    = 256 // ProxyStatus.NotReady, IdentityStatus.Error
	MaxStatusKeys    = 16  // IdentityStatus.Keys: the first ones
)
