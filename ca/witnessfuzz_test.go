package ca

import (
	"bytes"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

// fuzzWitness is a witness key, a host's log of 3 records whose checkpoint the
// witness holds, and that log grown to 5 records.
type fuzzWitness struct {
	witness witnessKey
	host    *memLog
	held    *witnessRecord
}

func newFuzzWitness(tb testing.TB) *fuzzWitness {
	tb.Helper()
	key := newKey(tb)
	signer, err := audit.NewNoteSigner(meshapi.CAAuditOrigin(testTD), key)
	if err != nil {
		tb.Fatal(err)
	}
	v, err := audit.NewNoteVerifier(signer.Name(), key.Public())
	if err != nil {
		tb.Fatal(err)
	}
	fw := &fuzzWitness{witness: witnessKey{NoteSigner: signer, verifier: v},
		host: newMemLog(tb, meshapi.AuditOrigin(spiffeid.RequireFromPath(testTD, "/host/h1")), newKey(tb))}
	fw.host.add(tb, "a", 3)
	fw.host.sign(tb)
	next, result, err := decideCheckpoint(nil, "spiffe://mesh.test/host/h1", fw.parse(tb, fw.host.request(tb, 0)), fw.witness, time.Unix(0, 0))
	if result != checkpointAccepted {
		tb.Fatalf("first checkpoint: %s %v", result, err)
	}
	fw.held = next
	fw.host.add(tb, "b", 2)
	fw.host.sign(tb)
	return fw
}

func (fw *fuzzWitness) parse(tb testing.TB, req meshapi.CheckpointRequest) checkpointRequest {
	tb.Helper()
	r, err := parseCheckpointRequest(req, fw.host.origin)
	if err != nil {
		tb.Fatal(err)
	}
	return r
}

// FuzzCheckpointRequest: a host's request never crashes the witness, and what the
// witness cosigns extends the checkpoint it held, signed by the bound key.
func FuzzCheckpointRequest(f *testing.F) {
	fw := newFuzzWitness(f)
	f.Add(mustJSON(f, fw.host.request(f, 3)))
	f.Add(mustJSON(f, fw.host.request(f, 0)))
	bad := fw.host.request(f, 3)
	bad.Proof = append(bad.Proof, bad.Proof[0])
	f.Add(mustJSON(f, bad))
	f.Add([]byte(`{"checkpoint":"x\n3\nAAAA\n\n— x AAAA\n","key":"x+00000000+AgA=","old_size":3,"proof":["AA=="]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var body meshapi.CheckpointRequest
		if meshapi.DecodeStrict(bytes.NewReader(b), &body) != nil {
			return
		}
		req, err := parseCheckpointRequest(body, fw.host.origin)
		if err != nil {
			return
		}
		next, result, err := decideCheckpoint(fw.held, "spiffe://mesh.test/host/h1", req, fw.witness, time.Unix(1, 0))
		if result != checkpointAccepted {
			return
		}
		if err != nil {
			t.Fatalf("accepted with an error: %v", err)
		}
		writer := verifier(t, fw.held.Key)
		_, c, err := audit.OpenCheckpoint([]byte(next.Cosigned), writer, fw.witness.verifier)
		if err != nil {
			t.Fatalf("cosigned does not verify: %v", err)
		}
		last, _ := fw.held.checkpoint()
		if err := audit.CheckConsistency(&last, c, req.proof); err != nil {
			t.Fatalf("cosigned a checkpoint that does not extend the one held: %v", err)
		}
	})
}

// FuzzWitnessRecord: a witness file never crashes the CA, and what it loads has a
// latest checkpoint signed by its key and the witness's.
func FuzzWitnessRecord(f *testing.F) {
	fw := newFuzzWitness(f)
	dir := f.TempDir()
	name := witnessFile(dir, fw.held.Origin)
	f.Add(mustJSON(f, fw.held))
	f.Add([]byte(`{"origin":"mesh.test/host/h1/audit","host":"","key":"","cosigned":"","history":null,"last_seen":"0001-01-01T00:00:00Z"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		rec, err := decodeWitnessRecord(b, name, fw.witness.verifier)
		if err != nil {
			return
		}
		if witnessFile(filepath.Dir(name), rec.Origin) != name || len(rec.History) == 0 {
			t.Fatalf("loaded a record of another file or without history: %+v", rec)
		}
		if _, _, err := audit.OpenCheckpoint([]byte(rec.Cosigned), verifier(t, rec.Key), fw.witness.verifier); err != nil {
			t.Fatalf("loaded a record whose checkpoint does not verify: %v", err)
		}
	})
}
