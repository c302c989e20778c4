package audit

// AnchorStepResult is how a proxy's part in one step of a rotation of the CA's trust
// anchors ended.
type AnchorStepResult string

const (
	// AnchorStepAcked: the CA accepted the proxy's acknowledgement.
	AnchorStepAcked AnchorStepResult = "acknowledged"
	// AnchorStepRefused: the CA refused the acknowledgement (a stale step, say).
	AnchorStepRefused AnchorStepResult = "refused"
	// AnchorStepProbeFailed: the probe chain did not verify with the bundle in force;
	// the step is not acknowledged.
	AnchorStepProbeFailed AnchorStepResult = "probe_failed"
)

// AnchorStep records the outcome of a proxy's part in one step of a rotation of the
// CA's trust anchors: it installed the step's bundle, verified the probe, renewed the
// SVIDs not issued by the step's issuer and acknowledged.
type AnchorStep struct {
	SPIFFEID      string           `json:"spiffe_id"` // the host's
	RotationID    uint64           `json:"rotation_id"`
	Phase         string           `json:"phase"`
	BundleVersion string           `json:"bundle_version"`
	Issuer        string           `json:"issuer,omitempty"` // KeyFingerprint the SVIDs must be issued by
	Result        AnchorStepResult `json:"result"`
	// Renewed are the identities whose SVIDs were renewed for the step's issuer.
	Renewed []string `json:"renewed,omitempty"`
	// Attempts is how many acknowledgements were sent.
	Attempts int    `json:"attempts,omitempty"`
	Error    string `json:"error,omitempty"`
}

// Kind returns "anchor_step".
func (AnchorStep) Kind() string { return "anchor_step" }
