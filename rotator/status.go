package rotator

import (
	"time"

	"github.com/agentmesh/agentmesh/audit"
)

// Status is a point-in-time view of the identity, for the admin API and
// `agentmesh status`.
type Status struct {
	SPIFFEID string `json:"spiffe_id"`
	Ready    bool   `json:"ready"`
	// Revoked is true while the current SVID has been dropped by Rotator.Revoke and
	// no new one obtained; RevokedSerial is the serial of the SVID that was dropped.
	Revoked       bool              `json:"revoked"`
	RevokedSerial string            `json:"revoked_serial,omitempty"`
	Error         string            `json:"error,omitempty"` // why not ready, or the last failed attempt
	Attempts      int               `json:"failed_attempts"` // since the current SVID was obtained
	RenewAt       time.Time         `json:"renew_at,omitzero"`
	Current       *CredentialStatus `json:"current,omitempty"`
	// Overlap lists the superseded SVIDs whose overlap has not ended, newest first.
	Overlap []CredentialStatus `json:"overlap,omitempty"`
	// Retired lists, newest first, the SVIDs no longer current nor in overlap whose
	// keys are not destroyed yet (overlap ended and being drained, expired, or
	// compromised), and the last few destroyed ones.
	Retired   []CredentialStatus `json:"retired,omitempty"`
	BundleLen int                `json:"bundle_authorities"`

	// NeedsToken is true while the CA refuses the identity's enrolment for good (its
	// bootstrap token used, expired or missing): once the current SVID, if any, has
	// expired, only a new token from `agentmesh token` gets the identity back.
	NeedsToken bool `json:"needs_token,omitempty"`
}

// CredentialStatus describes one SVID and its key.
type CredentialStatus struct {
	Version uint64 `json:"version"` // key version, as in the key_state audit records
	Serial  string `json:"serial"`
	// State is the key's lifecycle state: "active", "overlap", "compromised" or
	// "destroyed".
	State audit.KeyPhase `json:"state"`
	Cause Cause          `json:"cause"` // why it entered State
	Since time.Time      `json:"since"` // when it entered State
	// Handshakes counts the signatures made with the key: one per full handshake.
	Handshakes   uint64    `json:"handshakes"`
	NotBefore    time.Time `json:"not_before"`
	NotAfter     time.Time `json:"not_after"`
	OverlapUntil time.Time `json:"overlap_until,omitzero"`
	// DrainBy is, once the credential is retired, when its last connection will have
	// been closed (retirement plus the drain grace).
	DrainBy time.Time `json:"drain_by,omitzero"`
}

// Status reports the current state. Safe for concurrent use.
func (r *Rotator) Status() Status {
	s := r.state.Load()
	st := Status{
		SPIFFEID:  r.cfg.ID.String(),
		Attempts:  s.attempts,
		BundleLen: len(s.bundle.X509Authorities()),
	}
	if _, err := s.valid(time.Now()); err != nil {
		st.Error = err.Error()
	} else {
		st.Ready = true
	}
	if s.lastErr != nil {
		st.Error = s.lastErr.Error()
	}
	st.NeedsToken = s.needsToken
	if d := s.dropped; d != nil {
		if s.dropCause == CauseRevoked {
			st.Revoked, st.RevokedSerial = true, d.serial
		}
		st.Retired = append(st.Retired, describe(d))
	}
	if s.current != nil {
		st.RenewAt = s.renewAt
		cs := describe(s.current)
		st.Current = &cs
	}
	for _, o := range s.overlap {
		st.Overlap = append(st.Overlap, describe(o))
	}
	for _, o := range s.retired {
		st.Retired = append(st.Retired, describe(o))
	}
	return st
}

func describe(c *credential) CredentialStatus {
	leaf := c.svid.Certificates[0]
	return CredentialStatus{
		Version:      c.version,
		Serial:       c.serial,
		State:        c.state,
		Cause:        c.cause,
		Since:        c.since,
		Handshakes:   c.handshakes.Load(),
		NotBefore:    leaf.NotBefore,
		NotAfter:     leaf.NotAfter,
		OverlapUntil: c.overlapUntil,
		DrainBy:      c.drainBy,
	}
}
