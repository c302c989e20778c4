package meshapi

import (
	"crypto/x509"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/svidrules"
)

// A rotation of the CA's trust anchors (its intermediate, or its root with a new
// intermediate under it) moves through phases the CA persists. In the phases proxies
// take part in, the directory publishes an AnchorRotation: a target every proxy
// converges to (the bundle the directory carries, and the issuer its SVIDs must come
// from) and then acknowledges. The CA advances only when every member proxy has
// acknowledged the step; see docs/ca-rotation.md.

// AnchorKind is what a rotation replaces.
type AnchorKind string

const (
	// RotateIntermediate replaces the intermediate (and its key) under the same root.
	RotateIntermediate AnchorKind = "intermediate"
	// RotateRoot replaces the root and the intermediate under it; the new and the old
	// root are cross-signed in both directions.
	RotateRoot AnchorKind = "root"
)

// AnchorPhase is a rotation's phase, as the CA persists and reports it.
type AnchorPhase string

const (
	// PhasePrepare generates the new key in the HSM and the new certificates.
	PhasePrepare AnchorPhase = "prepare"
	// PhaseDistribute publishes the bundle with the old and the new anchors; proxies
	// install it, verify the probe chain and acknowledge.
	PhaseDistribute AnchorPhase = "distribute"
	// PhaseActivate issues from the new key; proxies renew every SVID from the new
	// issuer, spread over the renew window, and acknowledge.
	PhaseActivate AnchorPhase = "activate"
	// PhaseRetire publishes the bundle without the old anchor; proxies acknowledge.
	PhaseRetire AnchorPhase = "retire"
	// PhaseDestroy deletes the old keys from the HSM and denies the old issuer.
	PhaseDestroy AnchorPhase = "destroy"
	// PhaseAbort returns to the old anchor: the CA issues from the old key again and
	// proxies renew from it and acknowledge, with both anchors still in the bundle.
	PhaseAbort AnchorPhase = "abort"
	// PhaseAbortRetire publishes the bundle without the new anchor after an abort;
	// proxies acknowledge.
	PhaseAbortRetire AnchorPhase = "abort-retire"
	// PhaseDone and PhaseAborted end a rotation.
	PhaseDone    AnchorPhase = "done"
	PhaseAborted AnchorPhase = "aborted"
)

// Acknowledged reports whether proxies acknowledge phase p.
func (p AnchorPhase) Acknowledged() bool {
	switch p {
	case PhaseDistribute, PhaseActivate, PhaseRetire, PhaseAbort, PhaseAbortRetire:
		return true
	default: // prepare, destroy and the ends are the CA's alone
		return false
	}
}

// Ended reports whether p ends a rotation.
func (p AnchorPhase) Ended() bool { return p == PhaseDone || p == PhaseAborted }

// AnchorRotation is the step of a trust-anchor rotation the directory publishes while
// proxies take part (an acknowledged phase); nil otherwise.
type AnchorRotation struct {
	// ID identifies the rotation; IDs only increase, across restarts too.
	ID   uint64     `json:"id"`
	Kind AnchorKind `json:"kind"`
	// Phase is the step to converge to and acknowledge.
	Phase AnchorPhase `json:"phase"`
	// BundleVersion is the version of the directory's bundle at this step: the one a
	// proxy installs and acknowledges.
	BundleVersion string `json:"bundle_version"`
	// Issuer, when set, is the KeyFingerprint of the CA certificate every SVID a proxy
	// holds (its own and its agents') must be issued by before it acknowledges: a proxy
	// renews each SVID issued by another.
	Issuer string `json:"issuer,omitempty"`
	// Probe is a test chain (PEM, leaf first) issued under the new anchor: a proxy
	// proves it installed the bundle by verifying it with the bundle in force.
	Probe string `json:"probe,omitempty"`
	// RenewWindowMS spreads the renewals Issuer asks for: each proxy waits a uniformly
	// random delay below it before renewing, so the CA is not stampeded.
	RenewWindowMS int64 `json:"renew_window_ms,omitempty"`
}

// RenewWindow is RenewWindowMS as a duration.
func (r AnchorRotation) RenewWindow() time.Duration {
	return time.Duration(r.RenewWindowMS) * time.Millisecond
}

// AnchorAckPath is where a proxy acknowledges a step: POST an AnchorAck, with its host
// SVID.
const AnchorAckPath = "/rotation/ack"

// AnchorAck acknowledges the step ID/Phase: the proxy holds the bundle BundleVersion,
// verified the probe with it, and holds only SVIDs from the step's issuer.
type AnchorAck struct {
	ID            uint64      `json:"id"`
	Phase         AnchorPhase `json:"phase"`
	BundleVersion string      `json:"bundle_version"`
}

// Check validates an acknowledgement's form.
func (a AnchorAck) Check() error {
	switch {
	case a.ID == 0:
		return fmt.Errorf("%w: id is required", ErrInvalidRequest)
	case !a.Phase.Acknowledged():
		return fmt.Errorf("%w: phase %q is not acknowledged by proxies", ErrInvalidRequest, a.Phase)
	case a.BundleVersion == "" || len(a.BundleVersion) > maxBundleVersion:
		return fmt.Errorf("%w: bundle_version is required, at most %d characters", ErrInvalidRequest, maxBundleVersion)
	}
	return nil
}

// KeyFingerprint names a certificate's key: the hex SHA-256 of its
// SubjectPublicKeyInfo. An SVID is issued by the CA certificate whose KeyFingerprint
// is that of the SVID's chain[1].
func KeyFingerprint(c *x509.Certificate) string { return svidrules.KeyFingerprint(c) }

// The admin socket's rotation API.
const (
	// AdminRotationPath: GET answers RotationStatus; POST a RotateRequest starts a
	// rotation (409 with the current phase while one runs).
	AdminRotationPath = "/rotation"
	// AdminRotationAbortPath: POST aborts the running rotation before retire.
	AdminRotationAbortPath = "/rotation/abort"
	// AdminRotationExcludePath: POST a RotationExclude excludes a proxy from the
	// acknowledgements of the running rotation (audited).
	AdminRotationExcludePath = "/rotation/exclude"
)

// RotateRequest starts a rotation.
type RotateRequest struct {
	Kind AnchorKind `json:"kind"`
	// Exclude are host IDs whose acknowledgements are not awaited.
	Exclude []spiffeid.ID `json:"exclude,omitempty"`
	// RenewWindowMS overrides the CA's renew window (0: the CA's).
	RenewWindowMS int64  `json:"renew_window_ms,omitempty"`
	Reason        string `json:"reason,omitempty"`
}

// RotationExclude excludes Host from the running rotation.
type RotationExclude struct {
	Host   spiffeid.ID `json:"host"`
	Reason string      `json:"reason,omitempty"`
}

// RotationAbort aborts the running rotation.
type RotationAbort struct {
	Reason string `json:"reason,omitempty"`
}

// RotationStatus is what `agentmesh ca rotation status --json` prints: the running
// rotation, or the last one (Phase done or aborted), or none (ID 0).
type RotationStatus struct {
	ID         uint64      `json:"id,omitempty"`
	Kind       AnchorKind  `json:"kind,omitempty"`
	Phase      AnchorPhase `json:"phase,omitempty"`
	Started    time.Time   `json:"started,omitzero"`
	PhaseSince time.Time   `json:"phase_since,omitzero"`
	// PhaseMS is the time spent in Phase so far.
	PhaseMS int64 `json:"phase_ms,omitempty"`
	// Waiting says what the next phase waits for, "" when nothing.
	Waiting       string `json:"waiting,omitempty"`
	BundleVersion string `json:"bundle_version,omitempty"`
	// Members are the proxies whose acknowledgements the rotation awaits (excluded
	// ones included, marked), sorted by ID.
	Members []RotationMember `json:"members,omitempty"`
	// Missing are the members that have not acknowledged Phase and are not excluded.
	Missing []spiffeid.ID `json:"missing,omitempty"`
	// Phases are the phases passed, with their times.
	Phases []PhaseTime `json:"phases,omitempty"`
	// Anchors are the trust anchors in force, with their expiry.
	Anchors []AnchorInfo `json:"anchors,omitempty"`
	// Error is the last failure of an effect (an HSM refusal, say); the phase is
	// retried.
	Error string `json:"error,omitempty"`
}

// RotationMember is one proxy of a rotation.
type RotationMember struct {
	ID            spiffeid.ID `json:"id"`
	LastHeartbeat time.Time   `json:"last_heartbeat,omitzero"`
	// Live: a heartbeat within the CA's live window.
	Live     bool `json:"live"`
	Excluded bool `json:"excluded,omitempty"`
	// Acked is the last phase the proxy acknowledged, and when.
	Acked   AnchorPhase `json:"acked,omitempty"`
	AckedAt time.Time   `json:"acked_at,omitzero"`
}

// PhaseTime is how long a rotation spent in one phase.
type PhaseTime struct {
	Phase AnchorPhase `json:"phase"`
	Start time.Time   `json:"start"`
	End   time.Time   `json:"end"`
	MS    int64       `json:"ms"`
}

// AnchorInfo describes one trust anchor.
type AnchorInfo struct {
	Subject     string    `json:"subject"`
	Fingerprint string    `json:"fingerprint"` // KeyFingerprint
	NotAfter    time.Time `json:"not_after"`
}
