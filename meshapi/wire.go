package meshapi

import (
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The request and answer bodies of the mesh API (/mesh/v1 on the CA's HTTPS API) and
// of the CA's admin socket, in JSON.

// RevokeRequest asks the CA to revoke an identity (every certificate of it issued
// before the revocation, and no new one until it is reinstated) or one certificate by
// serial. Exactly one of SPIFFEID and Serial is set. With Except, SPIFFEID's lineage is
// revoked instead of the identity.
type RevokeRequest struct {
	// SPIFFEID is the identity to revoke: a workload ID of the CA's trust domain.
	SPIFFEID string `json:"spiffe_id,omitempty"`
	// Serial is the decimal serial of one certificate this CA issued.
	Serial string `json:"serial,omitempty"`
	// Except, with SPIFFEID, revokes every unexpired certificate of the identity's
	// lineage but this one (a decimal serial), which must be the newest: what a
	// compromise rotation asks with its fresh certificate. The identity stays enrolled
	// and renews from Except only. ErrNotLineageHead when Except is not the newest.
	Except string `json:"except,omitempty"`
	// Reason is why, for the deny-list, the CRL and the audit log: required, at most
	// 256 printable ASCII characters.
	Reason string `json:"reason"`
}

// RevokeResult says what a revocation did.
type RevokeResult struct {
	// ListVersion is the deny-list version that carries the revocation.
	ListVersion uint64 `json:"list_version"`
	// Serials are the certificates the revocation covers: listed in the deny-list,
	// revoked in step-ca and so in its CRL.
	Serials []string `json:"serials"`
}

// ReinstateRequest asks the CA to let a revoked identity enrol again.
type ReinstateRequest struct {
	// SPIFFEID is the revoked identity: a workload ID of the CA's trust domain.
	SPIFFEID string `json:"spiffe_id"`
	// Reason is why, for the audit log: required, at most 256 printable ASCII
	// characters.
	Reason string `json:"reason"`
}

// ReinstateResult says what a reinstatement did.
type ReinstateResult struct {
	SPIFFEID string `json:"spiffe_id"`
	// Cutoff is the revocation's NotBefore cutoff: certificates of the identity with
	// an earlier NotBefore stay refused, by the CA and (while they are unexpired) by
	// the deny-list.
	Cutoff       time.Time `json:"cutoff"`
	RevokedAt    time.Time `json:"revoked_at"`
	ReinstatedAt time.Time `json:"reinstated_at"`
}

// EntryRequest is the body of the admin socket's POST /entries: an Entry whose uid
// must be present, so that a client that forgets it does not register root's
// processes.
type EntryRequest struct {
	ID   spiffeid.ID `json:"id"`
	Host spiffeid.ID `json:"host"`
	UID  *uint32     `json:"uid"`
	Port uint16      `json:"port,omitempty"`
}

// EntriesResponse answers GET /entries.
type EntriesResponse struct {
	Entries []Entry `json:"entries"`
}

// AgentTokenRequest is the body of POST /mesh/v1/agents/token. The ID is a string so
// that a malformed one gets a message naming it rather than a decoding error.
type AgentTokenRequest struct {
	ID string `json:"id"`
}

// RegisterRequest is the body of POST /mesh/v1/register. The SPIFFE ID is not in it:
// it is the client certificate's.
type RegisterRequest struct {
	Addresses []string `json:"addresses"`
	// TunnelPort is an int so that 0 or 70000 get a message naming the range rather
	// than a decoding error.
	TunnelPort    int      `json:"tunnel_port"`
	Transports    []string `json:"transports"`
	BundleVersion string   `json:"bundle_version,omitempty"`
	// Status is the proxy's own state for the CA's status page; nil from an older proxy.
	Status *ProxyStatus `json:"status,omitempty"`
}

// RegisterResponse answers a registration: the entry as stored and the directory
// version after it.
type RegisterResponse struct {
	Version uint64         `json:"version"`
	Peer    DirectoryEntry `json:"peer"`
}

// ClaimSource says how the CA came to allow a host its addresses.
type ClaimSource string

const (
	// ClaimAdmin is a claim an operator set on the admin socket.
	ClaimAdmin ClaimSource = "admin"
	// ClaimLearnt is a claim learnt at the host's first registration.
	ClaimLearnt ClaimSource = "learnt"
)

// HostClaim is what the proxy of Host may advertise: addresses inside Prefixes.
type HostClaim struct {
	Host     spiffeid.ID    `json:"host"`     // spiffe://TD/host/H
	Prefixes []netip.Prefix `json:"prefixes"` // masked, unmapped, sorted, 1 to 32 of them
	Source   ClaimSource    `json:"source"`
	// From is the address the host's first registration came from (learnt claims only).
	From netip.Addr `json:"from,omitzero"`
	At   time.Time  `json:"at"` // when the claim was set or learnt
}

// Allows reports whether a is inside one of c's prefixes.
func (c HostClaim) Allows(a netip.Addr) bool {
	return slices.ContainsFunc(c.Prefixes, func(p netip.Prefix) bool { return p.Contains(a) })
}

// PrefixStrings is c.Prefixes in text form.
func (c HostClaim) PrefixStrings() []string {
	out := make([]string, len(c.Prefixes))
	for i, p := range c.Prefixes {
		out[i] = p.String()
	}
	return out
}

// HostClaimRequest is the body of the admin socket's POST /hosts. Addresses are
// strings so that a malformed one gets a message naming it.
type HostClaimRequest struct {
	Host      spiffeid.ID `json:"host"`
	Addresses []string    `json:"addresses"`
}

// HostClaimsResponse answers GET /hosts.
type HostClaimsResponse struct {
	Hosts []HostClaim `json:"hosts"`
}

// TokenRequest is the body of POST /token.
type TokenRequest struct {
	SPIFFEID string `json:"spiffe_id"`
}

// TokenResponse is the answer to POST /token.
type TokenResponse struct {
	Token string `json:"token"`
}

// Check validates a revoke request for the trust domain td and returns the identity
// it names (zero for a serial). Errors wrap ErrInvalidRequest or ErrInvalidID.
func (req RevokeRequest) Check(td spiffeid.TrustDomain) (spiffeid.ID, error) {
	switch {
	case (req.SPIFFEID == "") == (req.Serial == ""):
		return spiffeid.ID{}, fmt.Errorf("%w: exactly one of spiffe_id and serial is required", ErrInvalidRequest)
	case req.Except != "" && (req.SPIFFEID == "" || !CanonicalSerial(req.Except)):
		return spiffeid.ID{}, fmt.Errorf("%w: except needs spiffe_id and a decimal certificate serial", ErrInvalidRequest)
	case req.Reason == "" || !ValidReason(req.Reason):
		return spiffeid.ID{}, fmt.Errorf("%w: reason is required: 1 to %d printable ASCII characters", ErrInvalidRequest, MaxReason)
	case req.Serial != "":
		if !CanonicalSerial(req.Serial) {
			return spiffeid.ID{}, fmt.Errorf("%w: serial %q is not a decimal certificate serial", ErrInvalidRequest, req.Serial)
		}
		return spiffeid.ID{}, nil
	}
	return workloadID(td, req.SPIFFEID)
}

// Check validates a reinstate request for the trust domain td and returns the identity
// it names. Errors wrap ErrInvalidRequest or ErrInvalidID.
func (req ReinstateRequest) Check(td spiffeid.TrustDomain) (spiffeid.ID, error) {
	if req.Reason == "" || !ValidReason(req.Reason) {
		return spiffeid.ID{}, fmt.Errorf("%w: reason is required: 1 to %d printable ASCII characters", ErrInvalidRequest, MaxReason)
	}
	return workloadID(td, req.SPIFFEID)
}

// workloadID parses s as a workload ID of td.
func workloadID(td spiffeid.TrustDomain, s string) (spiffeid.ID, error) {
	id, err := spiffeid.FromString(s)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: spiffe_id %q: %w", ErrInvalidID, s, err)
	}
	if err := CheckWorkloadID(td, id); err != nil {
		return spiffeid.ID{}, err
	}
	return id, nil
}
