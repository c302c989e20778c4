package meshclient

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/internal/testtlog"
	"github.com/agentmesh/agentmesh/meshapi"
)

// witnessServer stands for the CA's checkpoint endpoint over real TLS: it witnesses one
// host's log as the CA does, and answers with its own log's checkpoint.
type witnessServer struct {
	*httptest.Server
	t       *testing.T
	key     *audit.NoteSigner
	caLog   *testtlog.Tree
	code    string // the code of a 403, when set; every answer is then that
	mu      sync.Mutex
	held    *audit.Checkpoint
	heldMsg []byte
	got     []meshapi.CheckpointRequest
	callers []string
}

func newWitnessServer(t *testing.T, ca *testca.CA) *witnessServer {
	t.Helper()
	s := &witnessServer{t: t, key: signerFor(t, "example.org/ca/audit"), caLog: &testtlog.Tree{}}
	s.caLog.Add(t, 3, "ca")
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	s.TLS = &tls.Config{Certificates: []tls.Certificate{*servingCertificate(t, ca)}, ClientAuth: tls.RequestClientCert}
	s.Config.ErrorLog = slog.NewLogLogger(slog.DiscardHandler, slog.LevelError)
	s.StartTLS()
	t.Cleanup(s.Close)
	return s
}

func (s *witnessServer) serve(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || r.URL.Path != meshapi.Prefix+meshapi.AuditCheckpointPath || len(r.TLS.PeerCertificates) == 0 {
		http.NotFound(w, r)
		return
	}
	var req meshapi.CheckpointRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	id, _ := x509svid.IDFromCert(r.TLS.PeerCertificates[0])
	s.mu.Lock()
	defer s.mu.Unlock()
	s.got, s.callers = append(s.got, req), append(s.callers, id.String())
	if s.code != "" {
		writeCodeError(w, http.StatusForbidden, s.code)
		return
	}
	var heldSize uint64
	if s.held != nil {
		heldSize = s.held.Size
	}
	if req.OldSize != heldSize {
		w.WriteHeader(http.StatusConflict)
		writeJSON(w, meshapi.CheckpointConflict{Cosigned: string(s.heldMsg), Size: heldSize})
		return
	}
	writer, err := audit.ParseVerifierKey(req.Key)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	proof, err := decodeHashes(req.Proof)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	cosigned, c, err := audit.Cosign([]byte(req.Checkpoint), writer, s.held, proof, s.key)
	if errors.Is(err, audit.ErrInconsistent) {
		writeCodeError(w, http.StatusForbidden, meshapi.CodeAuditInconsistent)
		return
	} else if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	s.held, s.heldMsg = &c, cosigned
	s.caLog.Add(s.t, 2, "ca")
	caNote, caProof := s.caLog.Signed(s.t, "example.org/ca/audit", s.key, req.CASize)
	writeJSON(w, meshapi.CheckpointResponse{Cosigned: string(cosigned), WitnessKey: s.key.VerifierKey(),
		CACheckpoint: string(caNote), CAProof: encodeHashes(caProof)})
}

func writeCodeError(w http.ResponseWriter, status int, code string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"status": status, "message": "refused", "code": code})
}

func signerFor(t testing.TB, name string) *audit.NoteSigner {
	t.Helper()
	s, err := audit.NewNoteSigner(name, testca.NewKey(t))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// fakeCALog hands out a fixed cosignature and records what it observes.
type fakeCALog struct {
	mu       sync.Mutex
	cosigned []byte
	size     uint64
	observed []CACheckpoint
}

func (f *fakeCALog) Cosigned() ([]byte, uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.cosigned, f.size
}

func (f *fakeCALog) Observe(_ context.Context, cp CACheckpoint) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.observed = append(f.observed, cp)
	if _, c, err := audit.OpenCheckpoint(cp.Checkpoint, mustVerifier(cp.WitnessKey)); err == nil {
		f.cosigned, f.size = fmt.Appendf(nil, "cosigned %d", c.Size), c.Size
	}
}

func mustVerifier(key string) *audit.NoteVerifier {
	v, err := audit.ParseVerifierKey(key)
	if err != nil {
		panic(err)
	}
	return v
}

// TestAuditWitness: checkpoints go to the CA with the host SVID and come back
// cosigned; a CA holding another size answers a WitnessConflict, an inconsistent log
// ErrInconsistent; the CA's own checkpoint reaches the CALog with its proof, and the
// CALog's cosignature goes with the next checkpoint.
func TestAuditWitness(t *testing.T) {
	t.Parallel()
	ca := testca.New(t, testca.WithTrustDomain(testTD))
	srv := newWitnessServer(t, ca)
	host := testca.TLSCertificate(ca.SVID(t, idA))
	caLog := &fakeCALog{}
	w, err := NewAuditWitness(Config{URL: srv.URL, Roots: ca.Roots(),
		Certificate: func() (*tls.Certificate, error) { return host, nil }}, caLog)
	if err != nil {
		t.Fatal(err)
	}
	writer := signerFor(t, "example.org/host/a/audit")
	log := &testtlog.Tree{}
	log.Add(t, 4, "host")
	note, _ := log.Signed(t, "example.org/host/a/audit", writer, 0)
	cosigned, err := w.Witness(t.Context(), audit.WitnessRequest{Checkpoint: note, Key: writer.VerifierKey()})
	if err != nil {
		t.Fatal(err)
	}
	if _, c, err := audit.OpenCheckpoint(cosigned, mustVerifier(writer.VerifierKey()), mustVerifier(srv.key.VerifierKey())); err != nil || c.Size != 4 {
		t.Fatalf("cosigned: %v, size %d", err, c.Size)
	}
	if len(caLog.observed) != 1 || caLog.observed[0].HostKey != writer.VerifierKey() || len(caLog.observed[0].Proof) != 0 {
		t.Fatalf("observed %+v", caLog.observed)
	}

	// The next one carries a proof from 4 and the CALog's cosignature of the CA's log
	// at 5; the CA proves its log at 7 from 5.
	log.Add(t, 3, "host")
	note, proof := log.Signed(t, "example.org/host/a/audit", writer, 4)
	if _, err := w.Witness(t.Context(), audit.WitnessRequest{Checkpoint: note, Key: writer.VerifierKey(), OldSize: 4, Proof: proof}); err != nil {
		t.Fatal(err)
	}
	if got := srv.got[1]; got.CACosigned != "cosigned 5" || got.CASize != 5 || got.OldSize != 4 || len(got.Proof) != len(proof) {
		t.Errorf("second request %+v", got)
	}
	if obs := caLog.observed[1]; len(obs.Proof) == 0 {
		t.Errorf("the CA's checkpoint came without its proof from 5")
	}
	if srv.callers[1] != idA.String() {
		t.Errorf("caller %s, want %s", srv.callers[1], idA)
	}

	// The host lost its record of what the CA holds: a conflict naming it.
	_, err = w.Witness(t.Context(), audit.WitnessRequest{Checkpoint: note, Key: writer.VerifierKey()})
	wc, ok := errors.AsType[*audit.WitnessConflict](err)
	if !ok || wc.Size != 7 || len(wc.Cosigned) == 0 {
		t.Fatalf("err = %v, want a WitnessConflict at 7 with the checkpoint held", err)
	}

	// A rewritten log of the same history's size plus one: refused as inconsistent.
	other := &testtlog.Tree{}
	other.Add(t, 8, "rewritten")
	note, proof = other.Signed(t, "example.org/host/a/audit", writer, 7)
	_, err = w.Witness(t.Context(), audit.WitnessRequest{Checkpoint: note, Key: writer.VerifierKey(), OldSize: 7, Proof: proof})
	if re, ok := errors.AsType[*meshapi.ResponseError](err); !errors.Is(err, audit.ErrInconsistent) || !ok || re.Status != http.StatusForbidden {
		t.Fatalf("err = %v, want ErrInconsistent and a 403 ResponseError", err)
	}

	// A 403 for another reason is not an inconsistency.
	srv.mu.Lock()
	srv.code = "forbidden"
	srv.mu.Unlock()
	_, err = w.Witness(t.Context(), audit.WitnessRequest{Checkpoint: note, Key: writer.VerifierKey(), OldSize: 7, Proof: proof})
	if re, ok := errors.AsType[*meshapi.ResponseError](err); errors.Is(err, audit.ErrInconsistent) || !ok || re.Status != http.StatusForbidden {
		t.Fatalf("err = %v, want a 403 ResponseError that is no inconsistency", err)
	}
}

// TestAuditWitnessChecksTheAnswer: a cosigned checkpoint that is not the one sent, or
// lacks the witness's signature, is an error, not a witnessed checkpoint.
func TestAuditWitnessChecksTheAnswer(t *testing.T) {
	t.Parallel()
	writer, witness := signerFor(t, "w"), signerFor(t, "ca")
	log := &testtlog.Tree{}
	log.Add(t, 2, "x")
	sent, _ := log.Signed(t, "o", writer, 0)
	log.Add(t, 1, "x")
	other, _ := log.Signed(t, "o", writer, 0)
	cosign := func(msg []byte) []byte {
		out, _, err := audit.Cosign(msg, mustVerifier(writer.VerifierKey()), nil, nil, witness)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	req := audit.WitnessRequest{Checkpoint: sent, Key: writer.VerifierKey()}
	tests := []struct {
		name     string
		cosigned []byte
		ok       bool
	}{
		{name: "cosigned", cosigned: cosign(sent), ok: true},
		{name: "not cosigned", cosigned: sent},
		{name: "another checkpoint", cosigned: cosign(other)},
		{name: "garbage", cosigned: []byte("x")},
	}
	for _, tc := range tests {
		err := checkCosigned(req, tc.cosigned, witness.VerifierKey())
		if (err == nil) != tc.ok || (err != nil && !errors.Is(err, audit.ErrCheckpoint)) {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
}
