package audit

// StatusAccess records a request for the CA's status page refused: the page shows the
// whole fleet (hosts, identities, revocations), so a caller without an admin SVID who
// asks for it is someone an auditor wants to know about. Pages served are not recorded:
// the page polls every second.
type StatusAccess struct {
	// Actor is the caller: the SPIFFE ID and serial of its client certificate, or
	// InitiatorUnauthenticated without one.
	Actor
	Result Result `json:"result"` // ResultRefused
	// Path is the path asked for (at most 256 bytes; longer ones are cut).
	Path string `json:"path"`
	// Reason says why: "no_certificate", "invalid_svid", "not_admin".
	Reason string `json:"reason"`
}

// Kind returns "status_access".
func (StatusAccess) Kind() string { return "status_access" }
