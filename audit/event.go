package audit

import "time"

// Event is one auditable occurrence. Kind is the record's "type" field: a short lowercase
// identifier such as "handshake" or "rotation". The value is marshalled with encoding/json
// when it is appended and its fields are written flat into the record, after the header
// fields, so it must marshal to a JSON object and must not use the header names "seq",
// "time", "type", "prev" or "hash".
type Event interface{ Kind() string }

// Handshake records one TLS handshake the proxy accepted, refused or failed.
type Handshake struct {
	Direction string `json:"direction"` // "inbound" | "outbound"
	Result    Result `json:"result"`
	Reason    string `json:"reason,omitempty"`
	Transport string `json:"transport"` // "tls", "h2" or "quic"
	// LocalID is the identity this proxy presented: its host's, or the local agent's on
	// whose behalf it dialled.
	LocalID string `json:"local_id,omitempty"`
	// LocalSerial is the serial (decimal) of the SVID this proxy presented.
	LocalSerial string        `json:"local_serial,omitempty"`
	PeerID      string        `json:"peer_id,omitempty"`
	PeerSerial  string        `json:"peer_serial,omitempty"`
	PeerAddr    string        `json:"peer_addr,omitempty"`
	TLSVersion  string        `json:"tls_version,omitempty"` // "TLS 1.3"
	Cipher      string        `json:"cipher,omitempty"`
	Resumed     bool          `json:"resumed"`
	Duration    time.Duration `json:"duration_ns"`
	// ConnID names a pooled connection (h2, quic); its streams' Connection records
	// carry the same.
	ConnID string `json:"conn_id,omitempty"`
	// PeerNotAfter and LocalNotAfter are the NotAfter of the peer's leaf and of the
	// one this proxy presented: a pooled connection carries no new stream past the
	// earlier.
	PeerNotAfter  time.Time `json:"peer_not_after,omitzero"`
	LocalNotAfter time.Time `json:"local_not_after,omitzero"`
}

// Kind returns "handshake".
func (Handshake) Kind() string { return "handshake" }

// Rotation records one credential enrolment or renewal attempt.
type Rotation struct {
	SPIFFEID string `json:"spiffe_id"`
	Trigger  string `json:"trigger"` // "enroll", "time", "expired", ...
	// Actor is who asked: "rotator" for its own schedule, "ca" for a fleet command,
	// "uid:N" for an operator at the proxy's control socket or the CA's admin socket.
	Actor
	OldSerial string    `json:"old_serial,omitempty"`
	NewSerial string    `json:"new_serial,omitempty"`
	NotAfter  time.Time `json:"not_after,omitzero"`
	Result    Result    `json:"result"` // ResultOK or ResultError
	Reason    string    `json:"reason,omitempty"`
	Started   time.Time `json:"started"`
	Finished  time.Time `json:"finished"`
}

// Kind returns "rotation".
func (Rotation) Kind() string { return "rotation" }

// Connection records a proxied connection when it closes.
type Connection struct {
	Direction string `json:"direction"` // "inbound" | "outbound"
	// LocalID is the identity this proxy presented (host or local agent), PeerID the one
	// the peer proxy presented (its host's, or the remote agent's).
	LocalID string `json:"local_id,omitempty"`
	PeerID  string `json:"peer_id,omitempty"`
	// DstID is the agent the connection reaches, when one is registered at the target
	// port: outbound, the remote agent; inbound, the local one.
	DstID string `json:"dst_id,omitempty"`
	// PeerSerial and LocalSerial are the serials (decimal) of the two SVIDs that
	// authenticated the tunnel.
	PeerSerial  string        `json:"peer_serial,omitempty"`
	LocalSerial string        `json:"local_serial,omitempty"`
	Target      string        `json:"target,omitempty"` // host:port the connection was spliced to
	Transport   string        `json:"transport,omitempty"`
	BytesIn     int64         `json:"bytes_in"`
	BytesOut    int64         `json:"bytes_out"`
	Duration    time.Duration `json:"duration_ns"`
	Reason      string        `json:"reason,omitempty"` // why it closed, when not a clean EOF
	// Started is when the connection (or stream) was accepted.
	Started time.Time `json:"started,omitzero"`
	// ConnID, PeerNotAfter and LocalNotAfter are, for a stream of a pooled
	// connection, those of its connection (Handshake).
	ConnID        string    `json:"conn_id,omitempty"`
	PeerNotAfter  time.Time `json:"peer_not_after,omitzero"`
	LocalNotAfter time.Time `json:"local_not_after,omitzero"`
}

// Kind returns "connection".
func (Connection) Kind() string { return "connection" }

// Revocation records one revocation request at the CA: who asked, what, why, and what
// it did.
type Revocation struct {
	// Actor is who asked: "uid:N" for the local admin socket, the caller's SPIFFE ID
	// and serial for the mTLS API.
	Actor
	SPIFFEID string `json:"spiffe_id,omitempty"` // the identity revoked, when by identity
	Serial   string `json:"serial,omitempty"`    // the serial revoked, when by serial
	Reason   string `json:"reason,omitempty"`
	Result   Result `json:"result"`
	Error    string `json:"error,omitempty"`
	// Serials are the certificate serials revoked in step-ca (and listed in the CRL).
	Serials []string `json:"serials,omitempty"`
	// ListVersion is the deny-list version that carries the revocation.
	ListVersion uint64 `json:"list_version,omitempty"`
	// Action is "reinstate" for a reinstatement of a revoked identity, empty for a
	// revocation.
	Action string `json:"action,omitempty"`
	// Via names the API a revocation came through when it is not agentmesh's own:
	// "step-ca" for step-ca's /revoke (the step CLI).
	Via string `json:"via,omitempty"`
}

// Kind returns "revocation".
func (Revocation) Kind() string { return "revocation" }

// DenyListChange records a proxy accepting or refusing a signed deny-list from the CA.
type DenyListChange struct {
	Version  uint64 `json:"version"`  // the version received
	Previous uint64 `json:"previous"` // the version held before
	Result   string `json:"result"`   // "applied" | "refused"
	// Reason says why a list was refused: "bad_signature", "stale_version",
	// "conflict", "gap", "premature_expiry", "malformed".
	Reason  string `json:"reason,omitempty"`
	Error   string `json:"error,omitempty"`
	IDs     int    `json:"ids"`     // identities the list denies
	Serials int    `json:"serials"` // serials the list denies
	// Closed is how many live connections applying the list closed.
	Closed int `json:"closed"`
	// Expired is how many entries of the list held the applied one dropped because
	// every certificate they covered had expired.
	Expired int `json:"expired,omitempty"`
	// Lag is the time from the list's signing at the CA to its application here.
	Lag time.Duration `json:"lag_ns,omitempty"`
}

// Kind returns "deny_list".
func (DenyListChange) Kind() string { return "deny_list" }

// KeyState records one lifecycle transition of a key (NIST SP 800-57 states):
// pre-activation → active → overlap → destroyed, or compromised at any point.
type KeyState struct {
	Key      KeyKind  `json:"key"`
	SPIFFEID string   `json:"spiffe_id,omitempty"` // the identity an SVID key belongs to
	Version  uint64   `json:"version"`             // per identity (svid) or per proxy (ticket), from 1
	Serial   string   `json:"serial,omitempty"`    // the SVID's certificate serial, once certified
	From     KeyPhase `json:"from,omitempty"`      // previous state; PhaseNone for a new key
	To       KeyPhase `json:"to"`
	// Cause says why: "enroll", "time", "usage", "operator", "compromise", "config",
	// "fleet", "revoked", "overlap_end", "expired", "schedule", "orphan", ...
	Cause    string    `json:"cause"`
	NotAfter time.Time `json:"not_after,omitzero"`
	// Label is the key's reference in its key store (a PKCS#11 CKA_LABEL), set when the
	// key is known by nothing else: an orphan left by an earlier process.
	Label string `json:"label,omitempty"`
}

// Kind returns "key_state".
func (KeyState) Kind() string { return "key_state" }

// Authorization records a connection the authorization policy denied, or a live one it
// closed after a policy change.
type Authorization struct {
	Direction string      `json:"direction"` // "inbound" | "outbound"
	Result    AuthzResult `json:"result"`
	SrcID     string      `json:"src_id,omitempty"`
	DstID     string      `json:"dst_id,omitempty"` // the agent or host the source wanted to reach
	Port      uint16      `json:"port,omitempty"`
	// Rule names the deciding rule ("inbound[2] \"name\"", "default").
	Rule     string `json:"rule"`
	PeerAddr string `json:"peer_addr,omitempty"`
	Target   string `json:"target,omitempty"`
	Policy   uint64 `json:"policy_version,omitempty"` // the policy version that decided
}

// Kind returns "authorization".
func (Authorization) Kind() string { return "authorization" }

// Policy records an authorization policy being loaded or refused.
type Policy struct {
	Path    string     `json:"path"`
	Version uint64     `json:"version"` // the version in force afterwards
	Result  LoadResult `json:"result"`
	Error   string     `json:"error,omitempty"`
	// Closed is how many live connections the new policy closed.
	Closed int `json:"closed"`
}

// Kind returns "policy".
func (Policy) Kind() string { return "policy" }

// ConfigResult is the outcome of a changed proxy configuration file.
type ConfigResult string

const (
	ConfigApplied ConfigResult = "applied" // the changed settings are in force
	ConfigRefused ConfigResult = "refused" // the file is invalid; the configuration in force stays
)

// ConfigChange records a changed proxy configuration file being applied or refused, so that
// an operator (and a test) sees a refusal and its reason (file:line: field) without
// reading the log.
type ConfigChange struct {
	Path   string       `json:"path"`
	Actor               // "file" | "sighup"
	Result ConfigResult `json:"result"`
	Error  string       `json:"error,omitempty"`
}

// Kind returns "config".
func (ConfigChange) Kind() string { return "config" }

// Registration records a change to the CA's registration entries, or a request for an
// agent's credential that the CA granted or refused.
type Registration struct {
	// Actor is who asked: "uid:N" on the admin socket, a proxy's SPIFFE ID and serial
	// on the mesh API.
	Actor
	Action   string  `json:"action"` // "register" | "unregister" | "token"
	SPIFFEID string  `json:"spiffe_id,omitempty"`
	Host     string  `json:"host,omitempty"`
	UID      *uint32 `json:"uid,omitempty"`
	Port     uint16  `json:"port,omitempty"`
	Result   string  `json:"result"` // "ok" | "refused" | "error"
	Error    string  `json:"error,omitempty"`
}

// Kind returns "registration".
func (Registration) Kind() string { return "registration" }
