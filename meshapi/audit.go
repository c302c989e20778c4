package meshapi

import (
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The witnessing of audit logs (docs/audit.md). Every proxy sends the CA a signed
// checkpoint of its audit log with a consistency proof from the last one the CA
// accepted; the CA checks it, cosigns it, keeps it, and answers with its own latest
// checkpoint and a consistency proof from the one this proxy last cosigned, which the
// proxy checks and cosigns in turn, returning the cosignature with its next checkpoint.
// So the CA witnesses every host's log and the proxies witness the CA's.

// AuditCheckpointPath is the mesh API's POST of a checkpoint (host SVID required).
// Answers: 200 CheckpointResponse; 409 CheckpointConflict when OldSize is not the size
// the CA holds (the proxy retries once with a proof from that size); 403 with code
// CodeAuditInconsistent when the checkpoint does not extend the one the CA holds (the
// log was rewritten, cut or forked: the CA keeps the old one, records and alerts).
const AuditCheckpointPath = "/audit/checkpoint"

// CodeAuditInconsistent is the error code of a checkpoint refused as inconsistent.
const CodeAuditInconsistent = "audit_log_inconsistent"

// WitnessPrefix is the public, read-only witness API on the CA's HTTPS port: no client
// certificate is needed, everything it serves is signed. GET WitnessPrefix +
// WitnessCheckpointsPath + "?origin=O" answers a WitnessedLog.
const (
	WitnessPrefix          = "/audit/v1"
	WitnessCheckpointsPath = "/checkpoints"
)

// AuditOrigin is the checkpoint origin of the audit log of the host (or CA) whose SVID
// is id: its trust domain and path, then "/audit", e.g. "example.org/host/h1/audit". The
// CA accepts a host's checkpoints only under the origin of the SVID that sends them.
func AuditOrigin(id spiffeid.ID) string {
	return id.TrustDomain().Name() + id.Path() + "/audit"
}

// CAAuditOrigin is the origin of the CA's own audit log.
func CAAuditOrigin(td spiffeid.TrustDomain) string {
	return td.Name() + "/ca/audit"
}

// CheckpointRequest is the body of POST AuditCheckpointPath.
type CheckpointRequest struct {
	// Checkpoint is the signed note (c2sp.org/tlog-checkpoint) of the host's log, signed
	// by Key, under the host's AuditOrigin.
	Checkpoint string `json:"checkpoint"`
	// Key is the host's audit verifier key (audit.NoteVerifier.Key). The CA binds it to
	// the host at the first checkpoint and refuses another later.
	Key string `json:"key"`
	// OldSize is the size of the checkpoint the host believes the CA holds (0: none),
	// and Proof the consistency proof from it to Checkpoint, base64 hashes.
	OldSize uint64   `json:"old_size"`
	Proof   []string `json:"proof,omitempty"`

	// CACosigned is the CA checkpoint of the previous answer, cosigned by this host's
	// key after it checked it; empty when it had none or refused it.
	CACosigned string `json:"ca_cosigned,omitempty"`
	// CASize is the size of the CA checkpoint this host last cosigned (0: none): the CA
	// answers with a consistency proof from it.
	CASize uint64 `json:"ca_size"`
}

// CheckpointResponse answers an accepted checkpoint.
type CheckpointResponse struct {
	// Cosigned is the request's checkpoint with the CA's witness signature added.
	Cosigned string `json:"cosigned"`
	// WitnessKey is the CA's witness verifier key.
	WitnessKey string `json:"witness_key"`
	// CACheckpoint is the CA's latest signed checkpoint of its own log, signed by
	// WitnessKey; CAProof the consistency proof to it from the request's CASize.
	CACheckpoint string   `json:"ca_checkpoint,omitempty"`
	CAProof      []string `json:"ca_proof,omitempty"`
}

// CheckpointConflict answers 409: the CA holds a checkpoint of another size than the
// request's OldSize (the host lost its record of it, e.g. in a crash).
type CheckpointConflict struct {
	// Cosigned is the checkpoint the CA holds, cosigned; empty when it holds none.
	Cosigned string `json:"cosigned"`
	Size     uint64 `json:"size"`
}

// WitnessedLog answers GET WitnessPrefix + WitnessCheckpointsPath: what the witness
// holds of one log.
type WitnessedLog struct {
	Origin string `json:"origin"`
	// Key is the writer's verifier key the witness bound to the origin.
	Key string `json:"key"`
	// WitnessKeys are the verifier keys whose signatures make Latest witnessed: the
	// CA's for a host's log; the proxies' that cosigned it for the CA's own log.
	WitnessKeys []string `json:"witness_keys"`
	// Latest is the latest cosigned checkpoint.
	Latest string `json:"latest"`
	// History lists earlier accepted checkpoints, oldest first, bounded: a verifier
	// names the first one a rewritten log no longer matches.
	History []CheckpointSummary `json:"history,omitempty"`
	// LastSeen is when the writer last sent a checkpoint; State is "ok", "stale" (none
	// for longer than the stale interval) or "inconsistent" (its last one was refused).
	LastSeen time.Time `json:"last_seen"`
	State    string    `json:"state"`
}

// CheckpointSummary is an accepted checkpoint's size and root hash (base64).
type CheckpointSummary struct {
	Size uint64    `json:"size"`
	Hash string    `json:"hash"`
	Time time.Time `json:"time"`
}
