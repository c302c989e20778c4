package audit

// AddressClaim records a change to the addresses a host's proxy may claim in the CA's
// mesh directory (set or removed by an operator, or learnt at the host's first
// registration), or a registration the CA refused for claiming an address the host
// may not.
type AddressClaim struct {
	// Actor is who asked: "uid:N" on the admin socket, the caller's SPIFFE ID and
	// serial on the mesh API.
	Actor
	Action string `json:"action"` // "register" | "unregister" | "learn" | "claim"
	Host   string `json:"host,omitempty"`
	// Address is the address (or prefix) refused, or the one a claim was learnt from.
	Address string `json:"address,omitempty"`
	// Owner is the host another address or prefix is allowed to, for a conflict.
	Owner string `json:"owner,omitempty"`
	// Allowed are the prefixes the host may claim after the action (or before a
	// refused one).
	Allowed []string `json:"allowed,omitempty"`
	// PeerAddr is the address the caller connected from (mesh API).
	PeerAddr string `json:"peer_addr,omitempty"`
	Result   string `json:"result"` // "ok" | "refused" | "error"
	// Reason says why a claim was refused: "outside_claim", "foreign_address",
	// "unverified_source", "overlap", "invalid", "not_found".
	Reason string `json:"reason,omitempty"`
	Error  string `json:"error,omitempty"`
}

// Kind returns "address_claim".
func (AddressClaim) Kind() string { return "address_claim" }
