package meshapi

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DirectoryDocument is the mesh directory as GET /mesh/v1/directory (and the admin
// socket's GET /directory) serve it: every live proxy, the revocation deny-list and the
// registration entries, the trust bundle, at one version. Later sections will be added
// as further fields; readers ignore fields they do not know.
type DirectoryDocument struct {
	// Version increases (never repeats) on every change that matters to a peer: an
	// entry added or removed, its addresses, tunnel port or transports changed, a new
	// deny-list, a registration entry added or removed. A heartbeat that changes
	// nothing else does not bump it.
	Version uint64 `json:"version"`
	// Peers are the live entries, sorted by SPIFFE ID.
	Peers []DirectoryEntry `json:"peers"`
	// Revocations is the CA's current signed deny-list; the CA always sets it. Verify
	// it with VerifyDenyList: the directory itself is not signed.
	Revocations *SignedDenyList `json:"revocations,omitempty"`
	// Rotation is the latest fleet rotation an operator requested (every proxy
	// renews its credential), nil when there was none. Publishing a new one moves
	// the version.
	Rotation *FleetRotation `json:"rotation,omitempty"`
	// Entries are the registration entries, sorted by ID: which proxy holds which
	// agent identity, for which uid, and the agents' ports (see AgentsAt).
	Entries []Entry `json:"entries,omitempty"`
	// Bundle is the trust domain's bundle: the CA's roots. Optional: a document of an
	// older CA has none, and its readers keep the bundle they hold. It comes over the
	// TLS connection to the CA that the reader's own roots authenticate.
	Bundle *BundleDocument `json:"bundle,omitempty"`
	// AnchorRotation is the step of a rotation of the CA's trust anchors that proxies
	// converge to and acknowledge, nil when none is in such a step.
	AnchorRotation *AnchorRotation `json:"anchor_rotation,omitempty"`
}

// BundleDocument is the trust bundle as the directory serves it.
type BundleDocument struct {
	// Version names the roots: BundleVersion of them, which readers check.
	Version string `json:"version"`
	// Roots are the CA certificates, PEM, in the CA's order.
	Roots string `json:"roots"`
}

// BundleVersion names a set of trust anchors: the first 16 hex digits of the SHA-256
// of their DER, in order; the digest proxies report as bundle_version, so the version
// a proxy reports and the one the CA publishes compare.
func BundleVersion(anchors []*x509.Certificate) string {
	h := sha256.New()
	for _, a := range anchors {
		h.Write(a.Raw)
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// NewBundleDocument is the document of the roots anchors.
func NewBundleDocument(anchors []*x509.Certificate) *BundleDocument {
	var b strings.Builder
	for _, a := range anchors {
		_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: a.Raw}) // a strings.Builder does not fail
	}
	return &BundleDocument{Version: BundleVersion(anchors), Roots: b.String()}
}

// ParseBundle decodes b's roots and checks its version: at least one CA certificate,
// and nothing but certificates.
func ParseBundle(b *BundleDocument) ([]*x509.Certificate, error) {
	anchors, other, rest, err := pemCertificates(b.Roots)
	switch {
	case err != nil:
		return nil, fmt.Errorf("malformed bundle: %w", err)
	case len(other) > 0:
		return nil, fmt.Errorf("malformed bundle: a %s block", other[0])
	}
	for _, c := range anchors {
		if !c.IsCA {
			return nil, fmt.Errorf("malformed bundle: %s is not a CA", c.Subject)
		}
	}
	switch {
	case len(anchors) == 0 || len(bytes.TrimSpace(rest)) > 0:
		return nil, errors.New("malformed bundle: no roots, or text that is not PEM")
	case BundleVersion(anchors) != b.Version:
		return nil, fmt.Errorf("malformed bundle: version %q does not name its roots (%s)", b.Version, BundleVersion(anchors))
	}
	return anchors, nil
}

// DirectoryEntry is one registered proxy.
type DirectoryEntry struct {
	// SPIFFEID is the ID of the proxy's client certificate when it registered.
	SPIFFEID spiffeid.ID `json:"spiffe_id"`
	// Addresses are the IP addresses the proxy advertises, sorted; no other live
	// entry holds any of them.
	Addresses []netip.Addr `json:"addresses"`
	// TunnelPort is the port of the proxy's tunnel listener on those addresses.
	TunnelPort uint16 `json:"tunnel_port"`
	// Transports are the tunnel transports the proxy accepts, in its order of
	// preference ("tls", "h2", "quic").
	Transports []string `json:"transports"`
	// LastHeartbeat is when the CA last heard from the proxy. Informational: it
	// changes without a version bump.
	LastHeartbeat time.Time `json:"last_heartbeat"`
	// BundleVersion is the trust-bundle version the proxy reported holding.
	// Informational: it changes without a version bump.
	BundleVersion string `json:"bundle_version,omitempty"`
}

// Entry is a registration entry: the agent identity ID, which the proxy of Host may
// obtain and present for the processes of UID on that host.
type Entry struct {
	ID   spiffeid.ID `json:"id"`             // spiffe://TD/agent/NAME
	Host spiffeid.ID `json:"host"`           // spiffe://TD/host/H: the only proxy that gets ID's SVIDs
	UID  uint32      `json:"uid,omitempty"`  // the uid of the agent's processes on Host; served only to Host's proxy
	Port uint16      `json:"port,omitempty"` // where the agent listens on its host; 0: none
}

// CompareEntries orders entries by ID.
func CompareEntries(a, b Entry) int { return cmp.Compare(a.ID.String(), b.ID.String()) }

// FleetRotation is the latest fleet rotation the CA published.
type FleetRotation struct {
	// ID identifies the request. IDs only increase, across restarts too: each is at
	// least the CA's clock in microseconds and above the previous one, which is
	// persisted. A proxy acts on an ID at most once.
	ID uint64 `json:"id"`
	// At is when the CA accepted the request (its clock). A proxy whose Directory was
	// created after At does not act on it: its credential is already newer.
	At time.Time `json:"at"`
	// Reason is the operator's free text, for audit records: at most 256 printable
	// ASCII characters.
	Reason string `json:"reason,omitempty"`
}

// FleetDue decides what a client does with the fleet rotation fr of a directory
// answer, seen being the highest ID it has seen and created when it was created: fr
// is new when its ID is above seen (next is then its ID), and due (call is true) when
// it is new and was requested after created. A proxy that starts after a request does
// not rotate for it, and a replayed or older announcement never fires again. Pure.
func FleetDue(seen uint64, created time.Time, fr FleetRotation) (next uint64, call bool) {
	if fr.ID <= seen {
		return seen, false
	}
	return fr.ID, fr.At.After(created)
}
