package node

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/mod/sumdb/tlog"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/metrictest"
	"github.com/agentmesh/agentmesh/internal/testaudit"
)

const caOrigin = "example.org/ca/audit"

// memTree is a Merkle log in memory: the CA's, as the tests make it.
type memTree struct {
	hashes []tlog.Hash
	n      int64
}

func (m *memTree) ReadHashes(idx []int64) ([]tlog.Hash, error) {
	out := make([]tlog.Hash, len(idx))
	for i, x := range idx {
		if x >= int64(len(m.hashes)) {
			return nil, fmt.Errorf("hash %d not stored", x)
		}
		out[i] = m.hashes[x]
	}
	return out, nil
}

// grow appends n records whose text starts with prefix.
func (m *memTree) grow(t *testing.T, n int, prefix string) {
	t.Helper()
	for range n {
		h, err := tlog.StoredHashes(m.n, fmt.Appendf(nil, "%s %d", prefix, m.n), m)
		if err != nil {
			t.Fatal(err)
		}
		m.hashes, m.n = append(m.hashes, h...), m.n+1
	}
}

// signed is the tree's checkpoint signed by s, with the consistency proof from old.
func (m *memTree) signed(t *testing.T, s *audit.NoteSigner, old int64) ([]byte, tlog.TreeProof) {
	t.Helper()
	root, err := tlog.TreeHash(m.n, m)
	if err != nil {
		t.Fatal(err)
	}
	note, err := audit.SignCheckpoint(audit.Checkpoint{Origin: caOrigin, Size: uint64(m.n), Hash: root}, s)
	if err != nil {
		t.Fatal(err)
	}
	var proof tlog.TreeProof
	if old > 0 && old < m.n {
		if proof, err = tlog.ProveTree(m.n, old, m); err != nil {
			t.Fatal(err)
		}
	}
	return note, proof
}

func noteSigner(t *testing.T, name string) *audit.NoteSigner {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, err := audit.NewNoteSigner(name, key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// events collects audit records.
type events struct {
	mu  sync.Mutex
	all []audit.Event
}

func (e *events) Append(ev audit.Event) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.all = append(e.all, ev)
	return nil
}

func (e *events) refusals() []CAAuditRefusal {
	e.mu.Lock()
	defer e.mu.Unlock()
	return testaudit.Of[CAAuditRefusal](e.all)
}

type caLogFixture struct {
	path    string
	hostKey *ecdsa.PrivateKey
	host    *audit.NoteSigner
	ca      *audit.NoteSigner
	reg     *prometheus.Registry
	rec     *events
	l       *caLog
}

func newCALogFixture(t *testing.T) *caLogFixture {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	host, err := audit.NewNoteSigner("example.org/host/a/audit", key)
	if err != nil {
		t.Fatal(err)
	}
	f := &caLogFixture{path: filepath.Join(t.TempDir(), caAuditFile), hostKey: key, host: host,
		ca: noteSigner(t, caOrigin)}
	f.reopen(t)
	return f
}

// reopen makes a new caLog on the fixture's file, as a restarted proxy does.
func (f *caLogFixture) reopen(t *testing.T) {
	t.Helper()
	f.reg, f.rec = prometheus.NewRegistry(), &events{}
	l, err := newCALog(f.path, caOrigin, f.hostKey, f.rec, f.reg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	f.l = l
}

func (f *caLogFixture) observe(t *testing.T, signer *audit.NoteSigner, tree *memTree) {
	t.Helper()
	_, held := f.l.Cosigned()
	note, proof := tree.signed(t, signer, int64(held))
	f.l.observe(t.Context(), caCheckpoint{witnessKey: signer.VerifierKey(), note: note, proof: proof,
		hostKey: f.host.VerifierKey()})
}

// cosigned checks that the CA checkpoint held is tree's, signed by the CA and by the host.
func (f *caLogFixture) cosigned(t *testing.T, tree *memTree) {
	t.Helper()
	note, size := f.l.Cosigned()
	if size != uint64(tree.n) {
		t.Fatalf("cosigned size %d, want %d", size, tree.n)
	}
	caV, _ := audit.ParseVerifierKey(f.ca.VerifierKey())
	hostV, _ := audit.ParseVerifierKey(f.host.VerifierKey())
	if _, c, err := audit.OpenCheckpoint(note, caV, hostV); err != nil || c.Size != uint64(tree.n) {
		t.Fatalf("cosigned checkpoint: %v (size %d)", err, c.Size)
	}
}

func (f *caLogFixture) refused(t *testing.T, reason string) {
	t.Helper()
	if got := f.rec.refusals(); len(got) != 1 || got[0].Reason != reason || got[0].Origin != caOrigin {
		t.Fatalf("refusal records %+v, want one %q", got, reason)
	}
	if v := metrictest.Value(t, f.reg, metricCAAuditInconsistent); v != 1 {
		t.Fatalf("%s = %v, want 1", metricCAAuditInconsistent, v)
	}
	if note, _ := f.l.Cosigned(); note != nil {
		t.Fatal("a CA checkpoint is still handed out after a refusal")
	}
}

// TestCALogCosigns: the first CA checkpoint pins the CA's key and is cosigned; each
// extension proven consistent is cosigned in turn, and kept across a restart.
func TestCALogCosigns(t *testing.T) {
	t.Parallel()
	f := newCALogFixture(t)
	if note, size := f.l.Cosigned(); note != nil || size != 0 {
		t.Fatalf("fresh state: %q, %d", note, size)
	}
	tree := &memTree{}
	tree.grow(t, 5, "r")
	f.observe(t, f.ca, tree)
	f.cosigned(t, tree)
	tree.grow(t, 12, "r")
	f.observe(t, f.ca, tree)
	f.cosigned(t, tree)
	f.reopen(t)
	f.cosigned(t, tree)
	tree.grow(t, 1, "r")
	f.observe(t, f.ca, tree)
	f.cosigned(t, tree)
	if got := f.rec.refusals(); len(got) != 0 {
		t.Errorf("refusals %+v", got)
	}
	if v := metrictest.Value(t, f.reg, metricCAAuditInconsistent); v != 0 {
		t.Errorf("%s = %v", metricCAAuditInconsistent, v)
	}
	info, err := os.Stat(f.path)
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Errorf("state file: %v, mode %v", err, info.Mode())
	}
}

// TestCALogRefuses: a CA log rewritten since the checkpoint cosigned, or signed by
// another key, is refused: an audit record, the metric, nothing cosigned any more, and
// all of it still so after a restart.
func TestCALogRefuses(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		next   func(t *testing.T, f *caLogFixture) (*audit.NoteSigner, *memTree)
		reason string
	}{
		{name: "rewritten", reason: caRefusedInconsistent, next: func(t *testing.T, f *caLogFixture) (*audit.NoteSigner, *memTree) {
			other := &memTree{}
			other.grow(t, 9, "rewritten")
			return f.ca, other
		}},
		{name: "cut", reason: caRefusedInconsistent, next: func(t *testing.T, f *caLogFixture) (*audit.NoteSigner, *memTree) {
			cut := &memTree{}
			cut.grow(t, 3, "r")
			return f.ca, cut
		}},
		{name: "another key", reason: caRefusedKey, next: func(t *testing.T, f *caLogFixture) (*audit.NoteSigner, *memTree) {
			tree := &memTree{}
			tree.grow(t, 9, "r")
			return noteSigner(t, caOrigin), tree
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newCALogFixture(t)
			tree := &memTree{}
			tree.grow(t, 5, "r")
			f.observe(t, f.ca, tree)
			signer, next := tc.next(t, f)
			f.observe(t, signer, next)
			f.refused(t, tc.reason)
			if _, size := f.l.Cosigned(); size != 5 {
				t.Errorf("held size %d, want 5", size)
			}
			// A consistent one afterwards changes nothing: the refusal sticks.
			tree.grow(t, 2, "r")
			f.observe(t, f.ca, tree)
			f.refused(t, tc.reason)
			var st caAuditState
			if err := json.Unmarshal(readTestFile(t, f.path), &st); err != nil || st.Refused != tc.reason {
				t.Fatalf("state file: %+v, %v", st, err)
			}
			f.reopen(t)
			if v := metrictest.Value(t, f.reg, metricCAAuditInconsistent); v != 1 {
				t.Errorf("after restart %s = %v, want 1", metricCAAuditInconsistent, v)
			}
		})
	}
}

// TestCALogIgnoresMalformed: a checkpoint of another origin, or badly signed, is not
// cosigned and not taken for an inconsistency.
func TestCALogIgnoresMalformed(t *testing.T) {
	t.Parallel()
	f := newCALogFixture(t)
	tree := &memTree{}
	tree.grow(t, 4, "r")
	f.observe(t, f.ca, tree)
	tree.grow(t, 4, "r")
	root, err := tlog.TreeHash(tree.n, tree)
	if err != nil {
		t.Fatal(err)
	}
	other, err := audit.SignCheckpoint(audit.Checkpoint{Origin: "example.org/host/b/audit", Size: uint64(tree.n), Hash: root}, f.ca)
	if err != nil {
		t.Fatal(err)
	}
	proof, err := tlog.ProveTree(tree.n, 4, tree)
	if err != nil {
		t.Fatal(err)
	}
	f.l.observe(t.Context(), caCheckpoint{witnessKey: f.ca.VerifierKey(), note: other, proof: proof, hostKey: f.host.VerifierKey()})
	f.l.observe(t.Context(), caCheckpoint{witnessKey: f.ca.VerifierKey(), note: []byte("garbage"), hostKey: f.host.VerifierKey()})
	if _, size := f.l.Cosigned(); size != 4 {
		t.Errorf("held size %d, want 4", size)
	}
	if got := f.rec.refusals(); len(got) != 0 {
		t.Errorf("refusals %+v", got)
	}
}

func readTestFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
