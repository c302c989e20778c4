package audit

// The values of the record fields that other packages compare or switch on. They are
// typed, so a switch over one is checked for exhaustiveness (golangci-lint's exhaustive)
// and a misspelt value does not compile; their strings are the wire format and never
// change.

// Result is the outcome of a handshake, a rotation or a request (Handshake, Rotation,
// Revocation, Lineage; Registration, AddressClaim and DenyList still carry the same
// strings untyped).
type Result string

const (
	ResultOK      Result = "ok"      // done, or the connection was set up
	ResultRefused Result = "refused" // a verification or policy decision said no
	ResultError   Result = "error"   // an operational failure: the attempt could not be made
)

// LoadResult is the outcome of a policy file (Policy) or a deny-list (DenyList, whose
// field is still untyped) offered for use.
type LoadResult string

const (
	LoadApplied LoadResult = "applied" // in force
	LoadRefused LoadResult = "refused" // not usable; the one before stays in force
)

// AuthzResult is what the authorization policy did to a connection (Authorization).
type AuthzResult string

const (
	AuthzDenied AuthzResult = "denied" // a new connection the policy does not allow
	AuthzClosed AuthzResult = "closed" // a live connection a new policy no longer allows
)

// KeyPhase is a key's lifecycle state, after NIST SP 800-57 (KeyState.From and To): a
// key is made (pre-activation), certified and presented (active), superseded but still
// the credential of the connections it authenticated (overlap), then destroyed once those
// are drained; or compromised at any point, and then destroyed without grace.
type KeyPhase string

const (
	PhaseNone          KeyPhase = ""               // KeyState.From of a new key
	PhasePreActivation KeyPhase = "pre-activation" // made, not certified yet
	PhaseActive        KeyPhase = "active"         // presented in new handshakes (SVID) or encrypting (ticket)
	PhaseOverlap       KeyPhase = "overlap"        // verify or decrypt only
	PhaseCompromised   KeyPhase = "compromised"    // revoked: no grace
	PhaseDestroyed     KeyPhase = "destroyed"      // gone from its key store, its bytes zeroed
)

// KeyKind is what kind of key a KeyState record is about.
type KeyKind string

const (
	KeySVID   KeyKind = "svid"   // an SVID's private key (rotator)
	KeyTicket KeyKind = "ticket" // a TLS session-ticket key (proxy)
)
