package meshclient

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"

	"golang.org/x/mod/sumdb/tlog"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

// opCheckpoint names the checkpoint call in errors.
const opCheckpoint = "audit checkpoint"

// AuditWitness is the CA as the witness of this proxy's audit log: it implements
// audit.Witness over the mesh API (POST /mesh/v1 + meshapi.AuditCheckpointPath, with the
// host SVID of Config.Certificate). The same call carries this proxy's witnessing of the
// CA's own log, which CALog does. Safe for concurrent use.
type AuditWitness struct {
	conn *conn
	ca   CALog
}

// CALog is the proxy's half of witnessing the CA's own audit log, carried by every
// checkpoint the proxy sends: it checks each CA checkpoint an answer carries against
// the last one it cosigned, cosigns it, and hands the cosignature back for the next
// request. Its methods must be safe for concurrent use: witness calls may overlap.
type CALog interface {
	// Cosigned returns the last CA checkpoint this host cosigned, with its
	// cosignature (nil: none, or none it will vouch for), and the size of the last CA
	// checkpoint it cosigned (0: none), from which the CA proves its next one.
	Cosigned() (note []byte, size uint64)
	// Observe is given the CA's checkpoint of an answer. It handles its own failures:
	// the CA's log being inconsistent does not make this host's checkpoint less
	// witnessed.
	Observe(ctx context.Context, cp CACheckpoint)
}

// CACheckpoint is the CA's latest checkpoint of its own log, as an answer to a host's
// checkpoint carries it.
type CACheckpoint struct {
	// WitnessKey is the CA's verifier key, which signs its checkpoints and its
	// cosignatures.
	WitnessKey string
	// Checkpoint is the signed note.
	Checkpoint []byte
	// Proof is the consistency proof from the size CALog.Cosigned gave.
	Proof tlog.TreeProof
	// HostKey is the verifier key of the host's checkpoint just witnessed: a
	// cosignature of the CA's log takes its name, the CA checks it with that key.
	HostKey string
}

// NewAuditWitness checks cfg (URL, Roots or Anchors, Certificate, Control) and returns
// an AuditWitness. ca witnesses the CA's log; nil: the proxy does not. It does not
// contact the CA.
func NewAuditWitness(cfg Config, ca CALog) (*AuditWitness, error) {
	c, err := newConn(cfg.withDefaults())
	if err != nil {
		return nil, err
	}
	return &AuditWitness{conn: c, ca: ca}, nil
}

// Witness sends req to the CA and returns the checkpoint with the CA's cosignature,
// checked against the writer's key and the CA's witness key the answer names. A CA that
// holds another size answers a *audit.WitnessConflict; one that finds the checkpoint
// inconsistent with the one it holds an error wrapping audit.ErrInconsistent. Any other
// refusal is a *meshapi.ResponseError with Op "audit checkpoint".
func (w *AuditWitness) Witness(ctx context.Context, req audit.WitnessRequest) ([]byte, error) {
	body := meshapi.CheckpointRequest{Checkpoint: string(req.Checkpoint), Key: req.Key, OldSize: req.OldSize,
		Proof: encodeHashes(req.Proof)}
	if w.ca != nil {
		cosigned, size := w.ca.Cosigned()
		body.CACosigned, body.CASize = string(cosigned), size
	}
	b, err := json.Marshal(body)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", opCheckpoint, err)
	}
	ctx, cancel := context.WithTimeout(ctx, defaultTimeout)
	defer cancel()
	status, ans, err := w.conn.send(ctx, opCheckpoint, http.MethodPost, meshapi.AuditCheckpointPath, b, meshapi.MaxResponse)
	if err != nil {
		return nil, err
	}
	cosigned, ca, err := parseCheckpointAnswer(req, status, ans)
	if err != nil {
		return nil, err
	}
	if w.ca != nil && ca != nil {
		w.ca.Observe(ctx, *ca)
	}
	return cosigned, nil
}

// parseCheckpointAnswer reads the CA's answer (status, body) to req: the checkpoint
// cosigned, and the CA's own checkpoint when the answer carries one. It never panics.
func parseCheckpointAnswer(req audit.WitnessRequest, status int, ans []byte) ([]byte, *CACheckpoint, error) {
	switch status {
	case http.StatusOK:
	case http.StatusConflict:
		return nil, nil, conflict(ans)
	case http.StatusForbidden:
		rerr := &meshapi.ResponseError{Op: opCheckpoint, Status: status, Message: meshapi.ErrorMessage(ans)}
		if refusedInconsistent(ans) {
			return nil, nil, fmt.Errorf("%w: %w", audit.ErrInconsistent, rerr)
		}
		return nil, nil, rerr
	default:
		return nil, nil, &meshapi.ResponseError{Op: opCheckpoint, Status: status, Message: meshapi.ErrorMessage(ans)}
	}
	var resp meshapi.CheckpointResponse
	if err := json.Unmarshal(ans, &resp); err != nil {
		return nil, nil, fmt.Errorf("ca: %s: malformed answer: %w", opCheckpoint, err)
	}
	cosigned := []byte(resp.Cosigned)
	if err := checkCosigned(req, cosigned, resp.WitnessKey); err != nil {
		return nil, nil, fmt.Errorf("ca: %s: %w", opCheckpoint, err)
	}
	if resp.CACheckpoint == "" {
		return cosigned, nil, nil
	}
	// A malformed proof fails the call, which the log counts and repeats (the CA's
	// answer to the next one, a conflict, names the size it accepted).
	proof, err := decodeHashes(resp.CAProof)
	if err != nil {
		return nil, nil, fmt.Errorf("ca: %s: ca checkpoint: %w", opCheckpoint, err)
	}
	return cosigned, &CACheckpoint{WitnessKey: resp.WitnessKey, Checkpoint: []byte(resp.CACheckpoint),
		Proof: proof, HostKey: req.Key}, nil
}

// conflict is the *audit.WitnessConflict a 409 answer carries.
func conflict(ans []byte) error {
	var c meshapi.CheckpointConflict
	if err := json.Unmarshal(ans, &c); err != nil {
		return fmt.Errorf("ca: %s: malformed conflict answer: %w", opCheckpoint, err)
	}
	wc := &audit.WitnessConflict{Size: c.Size}
	if c.Cosigned != "" {
		wc.Cosigned = []byte(c.Cosigned)
	}
	return wc
}

// refusedInconsistent reports whether a 403 answer carries meshapi.CodeAuditInconsistent
// (the code field of the error body).
func refusedInconsistent(ans []byte) bool {
	var e struct {
		Code string `json:"code"`
	}
	return json.Unmarshal(ans, &e) == nil && e.Code == meshapi.CodeAuditInconsistent
}

// checkCosigned checks that cosigned is the checkpoint of req signed by its writer and
// by witnessKey: what the log keeps as witnessed must be.
func checkCosigned(req audit.WitnessRequest, cosigned []byte, witnessKey string) error {
	writer, err := audit.ParseVerifierKey(req.Key)
	if err != nil {
		return err
	}
	witness, err := audit.ParseVerifierKey(witnessKey)
	if err != nil {
		return fmt.Errorf("witness key: %w", err)
	}
	_, sent, err := audit.OpenCheckpoint(req.Checkpoint, writer)
	if err != nil {
		return err
	}
	_, got, err := audit.OpenCheckpoint(cosigned, writer, witness)
	if err != nil {
		return fmt.Errorf("cosigned checkpoint: %w", err)
	}
	if got != sent {
		return fmt.Errorf("%w: the cosigned checkpoint is not the one sent", audit.ErrCheckpoint)
	}
	return nil
}

func encodeHashes(p tlog.TreeProof) []string {
	out := make([]string, len(p))
	for i, h := range p {
		out[i] = base64.StdEncoding.EncodeToString(h[:])
	}
	return out
}

// maxProofHashes bounds a consistency proof: at most two hashes per tree level.
const maxProofHashes = 128

func decodeHashes(s []string) (tlog.TreeProof, error) {
	if len(s) > maxProofHashes {
		return nil, fmt.Errorf("%w: proof of %d hashes", audit.ErrCheckpoint, len(s))
	}
	out := make(tlog.TreeProof, len(s))
	for i, h := range s {
		b, err := base64.StdEncoding.DecodeString(h)
		if err != nil || len(b) != len(out[i]) {
			return nil, fmt.Errorf("%w: proof hash %d is not 32 bytes of base64", audit.ErrCheckpoint, i)
		}
		copy(out[i][:], b)
	}
	return out, nil
}
