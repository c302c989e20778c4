package audit

import "time"

// CARotationAction is what a CARotation record reports.
type CARotationAction string

const (
	CARotationStart   CARotationAction = "start"   // an operator started a rotation (or it was refused)
	CARotationPhase   CARotationAction = "phase"   // the rotation entered a phase
	CARotationAck     CARotationAction = "ack"     // a proxy acknowledged a step (or was refused)
	CARotationExclude CARotationAction = "exclude" // an operator excluded a proxy from the gates
	CARotationAbort   CARotationAction = "abort"   // an operator aborted the rotation (or was refused)
	CARotationEffect  CARotationAction = "effect"  // the effects of a phase failed (retried)
)

// CARotation records one event of a rotation of the CA's trust anchors (its
// intermediate or its root), on the CA: every phase change, every acknowledgement
// accepted or refused, every exclusion, every failure of a phase's effects.
type CARotation struct {
	Action CARotationAction `json:"action"`
	// RotationID is the rotation's ID (0 when a request named none that exists).
	RotationID uint64 `json:"rotation_id,omitempty"`
	AnchorKind string `json:"anchor_kind,omitempty"` // "intermediate" | "root"
	// Phase is the phase entered (phase), acknowledged (ack) or whose effects failed.
	Phase string `json:"phase,omitempty"`
	// From is the phase left (phase).
	From          string `json:"from,omitempty"`
	BundleVersion string `json:"bundle_version,omitempty"`
	// Actor is who asked: "uid:N" on the admin socket, the proxy's SPIFFE ID and
	// serial for an acknowledgement, "ca" for the coordinator's own steps.
	Actor
	// Host is the proxy acknowledged or excluded.
	Host   string `json:"host,omitempty"`
	Result Result `json:"result"`
	// Reason is the operator's reason, or why a request was refused.
	Reason string `json:"reason,omitempty"`
	Error  string `json:"error,omitempty"`
	// PhaseDuration is how long the phase left lasted (phase).
	PhaseDuration time.Duration `json:"phase_duration_ns,omitempty"`
}

// Kind returns "ca_rotation".
func (CARotation) Kind() string { return "ca_rotation" }
