package rotator

import "time"

// Status is a point-in-time view of the identity, for the admin API and
// `agentmesh status`.
type Status struct {
	SPIFFEID  string             `json:"spiffe_id"`
	Ready     bool               `json:"ready"`
	Error     string             `json:"error,omitempty"` // why not ready, or the last failed attempt
	Attempts  int                `json:"failed_attempts"` // since the current SVID was obtained
	RenewAt   time.Time          `json:"renew_at,omitzero"`
	Current   *CredentialStatus  `json:"current,omitempty"`
	Overlap   []CredentialStatus `json:"overlap,omitempty"`
	BundleLen int                `json:"bundle_authorities"`
}

// CredentialStatus describes one SVID.
type CredentialStatus struct {
	Serial       string    `json:"serial"`
	State        string    `json:"state"` // "active" or "overlap"
	NotBefore    time.Time `json:"not_before"`
	NotAfter     time.Time `json:"not_after"`
	OverlapUntil time.Time `json:"overlap_until,omitzero"`
}

// Status reports the current state. Safe for concurrent use.
func (r *Rotator) Status() Status {
	s := r.state.Load()
	st := Status{
		SPIFFEID:  r.cfg.ID.String(),
		Attempts:  s.attempts,
		BundleLen: len(s.bundle.X509Authorities()),
	}
	if err := r.Ready(); err != nil {
		st.Error = err.Error()
	} else {
		st.Ready = true
	}
	if s.lastErr != nil {
		st.Error = s.lastErr.Error()
	}
	if s.current != nil {
		st.RenewAt = s.renewAt
		cs := describe(s.current, "active")
		st.Current = &cs
	}
	for _, o := range s.overlap {
		st.Overlap = append(st.Overlap, describe(o, "overlap"))
	}
	return st
}

func describe(c *credential, state string) CredentialStatus {
	leaf := c.svid.Certificates[0]
	return CredentialStatus{
		Serial:       c.serial,
		State:        state,
		NotBefore:    leaf.NotBefore,
		NotAfter:     leaf.NotAfter,
		OverlapUntil: c.overlapUntil,
	}
}
