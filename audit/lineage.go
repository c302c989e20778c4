package audit

// Lineage records an issuance the CA refused because of an identity's lineage: a
// renewal or rekey by a certificate that is not the newest of its identity nor in
// overlap (a fork of a stolen key), by a revoked serial or by an agent certificate, or
// an agent enrolment with a token granted to a host its registration no longer names.
type Lineage struct {
	// Op is the request: "renew", "rekey" or "sign".
	Op string `json:"op"`
	// Caller is the SPIFFE ID of the presenting certificate (renew, rekey) or the
	// subject of the token (sign).
	Caller string `json:"caller"`
	// Serial is the presenting certificate's serial (decimal); empty for sign.
	Serial string `json:"serial,omitempty"`
	// Head is the newest serial of the identity's lineage, when it has one.
	Head string `json:"head,omitempty"`
	// Host is the host a sign request's token was granted to.
	Host     string `json:"host,omitempty"`
	PeerAddr string `json:"peer_addr,omitempty"`
	Result   Result `json:"result"` // ResultRefused
	// Reason is "fork", "revoked", "agent_renewal" or "not_registered_host".
	Reason string `json:"reason"`
}

// Kind returns "lineage".
func (Lineage) Kind() string { return "lineage" }
