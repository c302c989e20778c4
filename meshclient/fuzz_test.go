package meshclient

import (
	"encoding/json"
	"errors"
	"net/http"
	"testing"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testtlog"
	"github.com/agentmesh/agentmesh/meshapi"
)

// FuzzCheckpointAnswer feeds arbitrary answers of the CA to a checkpoint: the client
// returns a cosigned checkpoint only when the CA's key and the writer's signed the one
// sent, and never panics.
func FuzzCheckpointAnswer(f *testing.F) {
	writer, witness := signerFor(f, "example.org/host/a/audit"), signerFor(f, "example.org/ca/audit")
	log := &testtlog.Tree{}
	log.Add(f, 3, "r")
	sent, _ := log.Signed(f, "example.org/host/a/audit", writer, 0)
	cosigned, _, err := audit.Cosign(sent, mustVerifier(writer.VerifierKey()), nil, nil, witness)
	if err != nil {
		f.Fatal(err)
	}
	ca := &testtlog.Tree{}
	ca.Add(f, 5, "ca")
	caNote, caProof := ca.Signed(f, "example.org/ca/audit", witness, 2)
	ok, err := json.Marshal(meshapi.CheckpointResponse{Cosigned: string(cosigned), WitnessKey: witness.VerifierKey(),
		CACheckpoint: string(caNote), CAProof: encodeHashes(caProof)})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(uint16(http.StatusOK), ok)
	f.Add(uint16(http.StatusConflict), []byte(`{"cosigned":"","size":7}`))
	f.Add(uint16(http.StatusForbidden), []byte(`{"status":403,"message":"no","code":"audit_log_inconsistent"}`))
	f.Add(uint16(http.StatusOK), []byte(`{"cosigned":"x","witness_key":"y","ca_proof":["!"]}`))
	req := audit.WitnessRequest{Checkpoint: sent, Key: writer.VerifierKey()}
	f.Fuzz(func(t *testing.T, status uint16, body []byte) {
		got, cp, err := parseCheckpointAnswer(req, int(status), body)
		if err != nil {
			if _, conflict := errors.AsType[*audit.WitnessConflict](err); conflict && status != http.StatusConflict {
				t.Fatalf("a conflict from status %d", status)
			}
			return
		}
		var resp meshapi.CheckpointResponse
		if json.Unmarshal(body, &resp) != nil {
			t.Fatal("accepted an answer that is not JSON")
		}
		if _, c, err := audit.OpenCheckpoint(got, mustVerifier(writer.VerifierKey()), mustVerifier(resp.WitnessKey)); err != nil || c.Size != 3 {
			t.Fatalf("accepted a cosigned checkpoint that does not verify: %v", err)
		}
		if cp != nil && cp.HostKey != req.Key {
			t.Fatal("the CA checkpoint names another host key")
		}
	})
}
