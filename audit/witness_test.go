package audit_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

const testOrigin = "example.org/host/h1/audit"

// testWitness is what the CA does with checkpoints, in memory: audit.Cosign with the
// checkpoint it holds, a 409-like *WitnessConflict when the log's idea of it differs, and
// meshapi.WitnessedLog over TLS for verifiers.
type testWitness struct {
	signer *audit.NoteSigner

	mu      sync.Mutex
	key     string // bound at first use
	latest  []byte
	held    *audit.Checkpoint
	history []meshapi.CheckpointSummary
	refused int // checkpoints found inconsistent: the CA's alert
}

func newTestWitness(t testing.TB) *testWitness {
	t.Helper()
	s, err := audit.NewNoteSigner("example.org/ca/witness", newKey(t))
	if err != nil {
		t.Fatal(err)
	}
	return &testWitness{signer: s}
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func (w *testWitness) Witness(_ context.Context, req audit.WitnessRequest) ([]byte, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.key != "" && w.key != req.Key {
		return nil, errors.New("witness: another key is bound to this origin")
	}
	writer, err := audit.ParseVerifierKey(req.Key)
	if err != nil {
		return nil, err
	}
	var size uint64
	if w.held != nil {
		size = w.held.Size
	}
	if req.OldSize != size {
		return nil, &audit.WitnessConflict{Size: size, Cosigned: w.latest}
	}
	out, c, err := audit.Cosign(req.Checkpoint, writer, w.held, req.Proof, w.signer)
	if errors.Is(err, audit.ErrInconsistent) {
		w.refused++
	}
	if err != nil {
		return nil, err
	}
	if w.held != nil {
		w.history = append(w.history, meshapi.CheckpointSummary{Size: w.held.Size, Hash: base64.StdEncoding.EncodeToString(w.held.Hash[:])})
	}
	w.key, w.latest, w.held = req.Key, out, &c
	return out, nil
}

func (w *testWitness) view() meshapi.WitnessedLog {
	w.mu.Lock()
	defer w.mu.Unlock()
	return meshapi.WitnessedLog{
		Origin: testOrigin, Key: w.key, WitnessKeys: []string{w.signer.VerifierKey()},
		Latest: string(w.latest), History: append([]meshapi.CheckpointSummary(nil), w.history...),
		LastSeen: time.Now(), State: "ok",
	}
}

// serve publishes the witness's view over TLS and returns its URL and a client trusting it.
func (w *testWitness) serve(t testing.TB) (string, *http.Client) {
	t.Helper()
	srv := httptest.NewTLSServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		if r.URL.Path != meshapi.WitnessPrefix+meshapi.WitnessCheckpointsPath || r.URL.Query().Get("origin") != testOrigin {
			http.NotFound(rw, r)
			return
		}
		_ = json.NewEncoder(rw).Encode(w.view()) // the client sees a short body
	}))
	t.Cleanup(srv.Close)
	return srv.URL, srv.Client()
}

// fetchView is what `audit verify --witness` does: GET the witnessed log over TLS.
func fetchView(t testing.TB, url string, client *http.Client) *audit.WitnessView {
	t.Helper()
	wl, err := meshapi.FetchWitnessedLog(t.Context(), client, url, testOrigin)
	if err != nil {
		t.Fatal(err)
	}
	v, err := wl.View()
	if err != nil {
		t.Fatal(err)
	}
	return &v
}

// witnessedLog writes n records to a log with checkpoints every step records, each
// cosigned by w, and returns the log's path and the writer's key.
func witnessedLog(t testing.TB, w *testWitness, n, step int) (string, *ecdsa.PrivateKey) {
	t.Helper()
	path := tempLog(t)
	key := newKey(t)
	l := start(t, audit.Config{Path: path, Origin: testOrigin, Signer: key, Witness: w,
		CheckpointRecords: 1 << 30, CheckpointInterval: time.Hour})
	for i := 0; i < n; i += step {
		appendSync(t, l, i, min(step, n-i))
		if err := l.Checkpoint(t.Context()); err != nil {
			t.Fatalf("Checkpoint: %v", err)
		}
	}
	if err := l.stop(); err != nil {
		t.Fatal(err)
	}
	return path, key
}

func verifierKey(t testing.TB, key *ecdsa.PrivateKey) string {
	t.Helper()
	s, err := audit.NewNoteSigner(testOrigin, key)
	if err != nil {
		t.Fatal(err)
	}
	return s.VerifierKey()
}
