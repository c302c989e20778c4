package ca

import (
	"cmp"
	"fmt"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/meshapi"
)

// anchorRecord is a rotation of the CA's trust anchors as StateDir/rotation.json
// keeps it: written (atomically) before the effects of each phase run, so that a CA
// killed at any point starts again in the phase it recorded and re-runs its effects,
// which are idempotent. Its methods are the rotation's pure core: no clock, no I/O.
type anchorRecord struct {
	ID        uint64              `json:"id"`
	Kind      meshapi.AnchorKind  `json:"kind"`
	Phase     meshapi.AnchorPhase `json:"phase"`
	Started   time.Time           `json:"started"`
	Since     time.Time           `json:"phase_since"`
	Initiator string              `json:"actor,omitempty"`
	Reason    string              `json:"reason,omitempty"`
	// RenewWindowMS is the window proxies spread their renewals over.
	RenewWindowMS int64 `json:"renew_window_ms"`
	// Bundle is the version of the bundle the current step publishes; Published every
	// version this rotation published (the only ones an acknowledgement may name).
	Bundle    string              `json:"bundle_version,omitempty"`
	Published []string            `json:"published,omitempty"`
	Members   []anchorMember      `json:"members"`
	Phases    []meshapi.PhaseTime `json:"phases,omitempty"`
	// Activated is when the new key started issuing (entry into activate), Reverted
	// when the old one started again (entry into abort after activate): the gates wait
	// for every certificate the replaced key issued to expire.
	Activated time.Time `json:"activated,omitzero"`
	Reverted  time.Time `json:"reverted,omitzero"`
	// OldIssuer and NewIssuer are the KeyFingerprints of the replaced and of the new
	// intermediate, recorded once prepare is done: the issuer denied at destroy (or,
	// after an abort, the new one if it issued), known even after its key is gone.
	OldIssuer string `json:"old_issuer,omitempty"`
	NewIssuer string `json:"new_issuer,omitempty"`
	// OldIssuerNotAfter and NewIssuerNotAfter are when those intermediates expire:
	// until then a certificate they signed would verify, so a retired one stays on the
	// deny-list until then.
	OldIssuerNotAfter time.Time `json:"old_issuer_not_after,omitzero"`
	NewIssuerNotAfter time.Time `json:"new_issuer_not_after,omitzero"`
	// Error is the last failure of the phase's effects, "" once they succeeded.
	Error string `json:"error,omitempty"`
}

// anchorMember is one proxy whose acknowledgements the rotation awaits.
type anchorMember struct {
	ID            spiffeid.ID         `json:"id"`
	LastHeartbeat time.Time           `json:"last_heartbeat,omitzero"`
	Excluded      bool                `json:"excluded,omitempty"`
	Acked         meshapi.AnchorPhase `json:"acked,omitempty"`
	AckedAt       time.Time           `json:"acked_at,omitzero"`
}

// ackRefusal classifies why an acknowledgement was refused.
type ackRefusal string

const (
	ackStale        ackRefusal = "stale"         // not the current rotation or phase
	ackUnpublished  ackRefusal = "unpublished"   // a bundle version this rotation never published
	ackNotConverged ackRefusal = "not_converged" // the caller's certificate is not from the step's issuer
	ackNotHost      ackRefusal = "not_host"
	ackMalformed    ackRefusal = "malformed"
)

// anchorPhaseAfter is each phase's successor once its gate opens: the forward path and
// the abort path. Ends (done, aborted) have none.
var anchorPhaseAfter = map[meshapi.AnchorPhase]meshapi.AnchorPhase{
	meshapi.PhasePrepare:     meshapi.PhaseDistribute,
	meshapi.PhaseDistribute:  meshapi.PhaseActivate,
	meshapi.PhaseActivate:    meshapi.PhaseRetire,
	meshapi.PhaseRetire:      meshapi.PhaseDestroy,
	meshapi.PhaseDestroy:     meshapi.PhaseDone,
	meshapi.PhaseAbort:       meshapi.PhaseAbortRetire,
	meshapi.PhaseAbortRetire: meshapi.PhaseAborted,
}

// nextAnchorPhase is the phase after p once its gate opens (p itself when p waits for
// nothing more). Pure.
func nextAnchorPhase(p meshapi.AnchorPhase) meshapi.AnchorPhase {
	if next, ok := anchorPhaseAfter[p]; ok {
		return next
	}
	return p
}

// abortable reports whether a rotation in phase p may still be aborted: before retire
// drops the old anchor.
func abortable(p meshapi.AnchorPhase) bool {
	return p == meshapi.PhasePrepare || p == meshapi.PhaseDistribute || p == meshapi.PhaseActivate
}

// newActive reports whether the new generation issues in phase p (between activate
// and the end of a rotation that was not aborted).
func newActive(p meshapi.AnchorPhase) bool {
	return p == meshapi.PhaseActivate || p == meshapi.PhaseRetire || p == meshapi.PhaseDestroy || p == meshapi.PhaseDone
}

// enter moves r to phase p at now, closing the current phase's time.
func (r *anchorRecord) enter(p meshapi.AnchorPhase, now time.Time) {
	r.Phases = append(r.Phases, meshapi.PhaseTime{Phase: r.Phase, Start: r.Since, End: now,
		MS: now.Sub(r.Since).Milliseconds()})
	r.Phase, r.Since, r.Error = p, now, ""
	switch {
	case p == meshapi.PhaseActivate:
		r.Activated = now
	case p == meshapi.PhaseAbort && !r.Activated.IsZero():
		r.Reverted = now
	}
}

// member returns the member id, nil when it is none.
func (r *anchorRecord) member(id spiffeid.ID) *anchorMember {
	i := slices.IndexFunc(r.Members, func(m anchorMember) bool { return m.ID == id })
	if i < 0 {
		return nil
	}
	return &r.Members[i]
}

// join adds id as a member (a proxy that registered during the rotation), or
// refreshes its heartbeat; it reports whether the record changed materially.
func (r *anchorRecord) join(id spiffeid.ID, heartbeat time.Time) bool {
	if m := r.member(id); m != nil {
		if heartbeat.After(m.LastHeartbeat) {
			m.LastHeartbeat = heartbeat
		}
		return false
	}
	r.Members = append(r.Members, anchorMember{ID: id, LastHeartbeat: heartbeat})
	slices.SortFunc(r.Members, func(a, b anchorMember) int { return cmp.Compare(a.ID.String(), b.ID.String()) })
	return true
}

// exclude removes id from the gates, as a member so that status shows it.
func (r *anchorRecord) exclude(id spiffeid.ID) {
	r.join(id, time.Time{})
	r.member(id).Excluded = true
}

// missing are the members that have not acknowledged the current phase and are not
// excluded.
func (r *anchorRecord) missing() []spiffeid.ID {
	var out []spiffeid.ID
	for _, m := range r.Members {
		if !m.Excluded && m.Acked != r.Phase {
			out = append(out, m.ID)
		}
	}
	return out
}

// drained is when every certificate the replaced key issued has expired, in a phase
// that waits for it (zero otherwise): the key stopped issuing at Activated (abort: it
// is the new key, stopped at Reverted) and issued for at most lifetime, backdated.
func (r *anchorRecord) drained(lifetime, backdate time.Duration) time.Time {
	switch {
	case r.Phase == meshapi.PhaseActivate:
		return r.Activated.Add(lifetime + backdate)
	case r.Phase == meshapi.PhaseAbort && !r.Reverted.IsZero():
		return r.Reverted.Add(lifetime + backdate)
	}
	return time.Time{}
}

// waiting says what keeps r in its phase at now, "" when its gate is open. Prepare
// and destroy wait only for their effects.
func (r *anchorRecord) waiting(now time.Time, lifetime, backdate time.Duration) string {
	if r.Phase.Ended() {
		return ""
	}
	if r.Error != "" {
		return "effects of " + string(r.Phase) + " failed (retrying): " + r.Error
	}
	if !r.Phase.Acknowledged() {
		return ""
	}
	if miss := r.missing(); len(miss) > 0 {
		return fmt.Sprintf("acknowledgements of %s from %d proxies", r.Phase, len(miss))
	}
	if d := r.drained(lifetime, backdate); now.Before(d) {
		return "expiry of the certificates the replaced key issued, at " + d.UTC().Format(time.RFC3339)
	}
	return ""
}

// checkAck decides whether ack from caller may stand against r: the current rotation
// and phase (else ackStale), a bundle version r published (else ackUnpublished).
// Pure.
func (r *anchorRecord) checkAck(ack meshapi.AnchorAck) (ackRefusal, error) {
	switch {
	case r == nil || r.Phase.Ended() || ack.ID != r.ID || ack.Phase != r.Phase:
		return ackStale, fmt.Errorf("%w: %s", errStaleAck, r.current())
	case !slices.Contains(r.Published, ack.BundleVersion):
		return ackUnpublished, fmt.Errorf("%w: bundle version %q was never published by rotation %d",
			ErrInvalidRequest, ack.BundleVersion, r.ID)
	case ack.BundleVersion != r.Bundle:
		return ackStale, fmt.Errorf("%w: bundle version %q is not the current %q (%s)", errStaleAck,
			ack.BundleVersion, r.Bundle, r.current())
	}
	return "", nil
}

// repeated reports whether ack repeats caller's last acknowledgement of r, the step
// passed since or not: a proxy whose acknowledgement was recorded but not answered (the
// CA killed in between) retries it after the rotation moved on, and is answered as
// accepted rather than stale.
func (r *anchorRecord) repeated(caller spiffeid.ID, ack meshapi.AnchorAck) bool {
	if r == nil || ack.ID != r.ID || !slices.Contains(r.Published, ack.BundleVersion) {
		return false
	}
	m := r.member(caller)
	return m != nil && m.Acked == ack.Phase
}

// current names r's step for an error message.
func (r *anchorRecord) current() string {
	if r == nil {
		return "no rotation"
	}
	return fmt.Sprintf("rotation %d is in phase %s", r.ID, r.Phase)
}

// acked records caller's acknowledgement of the current phase at now; it reports
// whether it is new. The caller becomes a member if it was not one.
func (r *anchorRecord) acked(caller spiffeid.ID, now time.Time) bool {
	r.join(caller, time.Time{})
	m := r.member(caller)
	if m.Acked == r.Phase {
		return false
	}
	m.Acked, m.AckedAt = r.Phase, now
	return true
}

// status is r as `rotation status` shows it at now; live reports whether a heartbeat
// is recent enough.
func (r *anchorRecord) status(now time.Time, live func(time.Time) bool, lifetime, backdate time.Duration) meshapi.RotationStatus {
	st := meshapi.RotationStatus{ID: r.ID, Kind: r.Kind, Phase: r.Phase, Started: r.Started, PhaseSince: r.Since,
		BundleVersion: r.Bundle, Phases: slices.Clone(r.Phases), Error: r.Error,
		Waiting: r.waiting(now, lifetime, backdate)}
	if !r.Phase.Ended() {
		st.PhaseMS = now.Sub(r.Since).Milliseconds()
	}
	for _, m := range r.Members {
		st.Members = append(st.Members, meshapi.RotationMember{ID: m.ID, LastHeartbeat: m.LastHeartbeat,
			Live: live(m.LastHeartbeat), Excluded: m.Excluded, Acked: m.Acked, AckedAt: m.AckedAt})
	}
	if r.Phase.Acknowledged() {
		st.Missing = r.missing()
	}
	return st
}

// nextAnchorID is the ID of a rotation started at now after the one with ID prev (0:
// none yet), as for fleet rotations.
func nextAnchorID(prev uint64, now time.Time) uint64 { return nextFleetID(prev, now) }
