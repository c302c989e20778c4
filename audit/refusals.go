package audit

import "time"

// Refusals records, for one source address and one interval, the connection attempts the
// proxy refused before the peer was authenticated: garbage and non-TLS bytes, failed or
// timed-out handshakes, certificates that do not verify, attempts over a connection limit,
// attempts while the audit log was failing. Anyone who can reach the tunnel port can make
// these, so they are counted per source rather than recorded one by one: a flood costs one
// record per source per interval, and the number of sources per interval is capped (the
// rest are folded into one record whose Source is "other").
type Refusals struct {
	Direction string `json:"direction"` // "inbound", or "outbound" for capture listeners over a limit
	// Source is the peer's IP address, or "other" for sources beyond the cap.
	Source string    `json:"source"`
	Count  uint64    `json:"count"`
	First  time.Time `json:"first"`
	Last   time.Time `json:"last"`
	// Reasons counts the attempts by refusal reason (the proxy's handshake reasons).
	Reasons map[string]uint64 `json:"reasons"`
	// Transports counts the attempts by transport ("tls", "h2", "quic", "none").
	Transports map[string]uint64 `json:"transports"`
	// Peers are the first few distinct certificates the source presented and had
	// refused (at most four per record), for forensics: who a refused chain claimed to be.
	Peers []RefusedPeer `json:"peers,omitempty"`
}

// RefusedPeer is a certificate presented in a refused attempt. Its claims are not
// verified: that is why the attempt was refused.
type RefusedPeer struct {
	PeerID     string `json:"peer_id,omitempty"`
	PeerSerial string `json:"peer_serial,omitempty"`
	Reason     string `json:"reason"`
}

// Kind returns "refusals".
func (Refusals) Kind() string { return "refusals" }
