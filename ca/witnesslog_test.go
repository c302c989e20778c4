package ca

import (
	"context"
	"crypto"
	"fmt"
	"net/http"
	"net/url"
	"sync"
	"testing"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

// memLog is an in-memory Merkle log that signs checkpoints: a host's audit log as the
// witness sees it (checkpoints and consistency proofs), and, given to
// Config.OpenAuditLog, the CA's own, keeping the records the CA appends.
type memLog struct {
	auditRecorder
	origin string
	signer *audit.NoteSigner

	mu     sync.Mutex
	hashes []tlog.Hash // stored hashes, tlog.StoredHashIndex layout
	n      int64
	latest []byte
	cp     audit.Checkpoint
}

func newMemLog(tb testing.TB, origin string, key crypto.Signer) *memLog {
	tb.Helper()
	s, err := audit.NewNoteSigner(origin, key)
	if err != nil {
		tb.Fatal(err)
	}
	return &memLog{origin: origin, signer: s}
}

// ReadHashes implements tlog.HashReader; called with mu held or on a settled log.
func (m *memLog) ReadHashes(idx []int64) ([]tlog.Hash, error) {
	out := make([]tlog.Hash, len(idx))
	for i, x := range idx {
		if x >= int64(len(m.hashes)) {
			return nil, fmt.Errorf("hash %d not stored", x)
		}
		out[i] = m.hashes[x]
	}
	return out, nil
}

// add appends records named prefix-i.
func (m *memLog) add(tb testing.TB, prefix string, count int) {
	tb.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	for range count {
		hs, err := tlog.StoredHashes(m.n, fmt.Appendf(nil, `{"seq":%d,"type":"%s"}`, m.n+1, prefix), m)
		if err != nil {
			tb.Fatal(err)
		}
		m.hashes = append(m.hashes, hs...)
		m.n++
	}
}

// sign signs a checkpoint of the whole log, which Latest returns from then on.
func (m *memLog) sign(tb testing.TB) []byte {
	tb.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	h, err := tlog.TreeHash(m.n, m)
	if err != nil {
		tb.Fatal(err)
	}
	m.cp = audit.Checkpoint{Origin: m.origin, Size: uint64(m.n), Hash: h}
	if m.latest, err = audit.SignCheckpoint(m.cp, m.signer); err != nil {
		tb.Fatal(err)
	}
	return m.latest
}

func (*memLog) Sync(context.Context) error       { return nil }
func (*memLog) Checkpoint(context.Context) error { return nil }

func (m *memLog) Latest() ([]byte, audit.Checkpoint) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.latest, m.cp
}

func (m *memLog) ProveConsistency(oldSize, newSize uint64) (tlog.TreeProof, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if oldSize == 0 || oldSize == newSize {
		return tlog.TreeProof{}, nil
	}
	return tlog.ProveTree(int64(newSize), int64(oldSize), m)
}

// request is a CheckpointRequest of m's latest checkpoint from oldSize.
func (m *memLog) request(tb testing.TB, oldSize uint64) meshapi.CheckpointRequest {
	tb.Helper()
	msg, c := m.Latest()
	proof, err := m.ProveConsistency(oldSize, c.Size)
	if err != nil {
		tb.Fatal(err)
	}
	return meshapi.CheckpointRequest{Checkpoint: string(msg), Key: m.signer.VerifierKey(), OldSize: oldSize, Proof: encodeProof(proof)}
}

// verifier is the verifier of a verifier key, failing the test when it does not parse.
func verifier(tb testing.TB, vkey string) note.Verifier {
	tb.Helper()
	v, err := audit.ParseVerifierKey(vkey)
	if err != nil {
		tb.Fatal(err)
	}
	return v
}

// postCheckpoint sends req to ca as the client hc.
func postCheckpoint(tb testing.TB, ca *runningCA, hc *http.Client, req meshapi.CheckpointRequest) (int, []byte) {
	tb.Helper()
	return do(tb, hc, http.MethodPost, ca.URL()+meshapi.Prefix+meshapi.AuditCheckpointPath, req)
}

// getWitnessed asks ca's public witness API for origin, without a client certificate.
func getWitnessed(tb testing.TB, ca *runningCA, origin string) (int, []byte) {
	tb.Helper()
	return do(tb, httpsClient(tb, ca, nil), http.MethodGet,
		ca.URL()+meshapi.WitnessPrefix+meshapi.WitnessCheckpointsPath+"?origin="+url.QueryEscape(origin), nil)
}
