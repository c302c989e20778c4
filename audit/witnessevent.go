package audit

// WitnessEvent records what the CA, as the witness of the proxies' audit logs, did that
// an auditor must see: a log's key bound at its first checkpoint, a checkpoint refused
// because it does not extend the one held (the log was rewritten, cut or forked) or
// because it is signed by another key than the one bound, and an operator forgetting a
// log so that a new one may start under its origin. Accepted checkpoints are not
// recorded: the witness store keeps them.
type WitnessEvent struct {
	// Actor is who acted: the host's SPIFFE ID and serial for a checkpoint, "uid:N" on
	// the admin socket for forget.
	Actor
	Action string `json:"action"` // "bind" | "checkpoint" | "forget"
	Origin string `json:"origin"`
	Result string `json:"result"` // "ok" | "refused" | "error"
	// Reason says why a checkpoint was refused: "inconsistent", "key_changed".
	Reason string `json:"reason,omitempty"`
	Error  string `json:"error,omitempty"`
	// Key is the writer's verifier key: the one bound, sent, or forgotten.
	Key string `json:"key,omitempty"`
	// Size and Hash (base64) are the checkpoint sent; HeldSize and HeldHash the one
	// the witness holds (the last it cosigned), which stays.
	Size     uint64 `json:"size,omitempty"`
	Hash     string `json:"checkpoint_hash,omitempty"`
	HeldSize uint64 `json:"held_size,omitempty"`
	HeldHash string `json:"held_hash,omitempty"`
}

// Kind returns "witness".
func (WitnessEvent) Kind() string { return "witness" }
