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
	Direction  string        `json:"direction"` // "inbound" | "outbound"
	Result     string        `json:"result"`    // "ok" | "refused" | "error"
	Reason     string        `json:"reason,omitempty"`
	Transport  string        `json:"transport"` // "tls" for now
	LocalID    string        `json:"local_id,omitempty"`
	PeerID     string        `json:"peer_id,omitempty"`
	PeerSerial string        `json:"peer_serial,omitempty"`
	PeerAddr   string        `json:"peer_addr,omitempty"`
	TLSVersion string        `json:"tls_version,omitempty"` // "TLS 1.3"
	Cipher     string        `json:"cipher,omitempty"`
	Resumed    bool          `json:"resumed"`
	Duration   time.Duration `json:"duration_ns"`
}

// Kind returns "handshake".
func (Handshake) Kind() string { return "handshake" }

// Rotation records one credential enrolment or renewal attempt.
type Rotation struct {
	SPIFFEID  string    `json:"spiffe_id"`
	Trigger   string    `json:"trigger"`   // "enroll", "time", "expired", ...
	Initiator string    `json:"initiator"` // "rotator", "operator", ...
	OldSerial string    `json:"old_serial,omitempty"`
	NewSerial string    `json:"new_serial,omitempty"`
	NotAfter  time.Time `json:"not_after,omitzero"`
	Result    string    `json:"result"` // "ok" | "error"
	Reason    string    `json:"reason,omitempty"`
	Started   time.Time `json:"started"`
	Finished  time.Time `json:"finished"`
}

// Kind returns "rotation".
func (Rotation) Kind() string { return "rotation" }

// Connection records a proxied connection when it closes.
type Connection struct {
	Direction string        `json:"direction"` // "inbound" | "outbound"
	PeerID    string        `json:"peer_id,omitempty"`
	Target    string        `json:"target,omitempty"` // host:port the connection was spliced to
	BytesIn   int64         `json:"bytes_in"`
	BytesOut  int64         `json:"bytes_out"`
	Duration  time.Duration `json:"duration_ns"`
	Reason    string        `json:"reason,omitempty"` // why it closed, when not a clean EOF
}

// Kind returns "connection".
func (Connection) Kind() string { return "connection" }
