package node

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/metrictest"
	"github.com/agentmesh/agentmesh/internal/testaudit"
	"github.com/agentmesh/agentmesh/internal/testtlog"
)

const caOrigin = "example.org/ca/audit"

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

func (r *auditRecords) caRefusals() []CAAuditRefusal {
	r.mu.Lock()
	defer r.mu.Unlock()
	return testaudit.Of[CAAuditRefusal](r.list)
}

type caLogFixture struct {
	path    string
	hostKey *ecdsa.PrivateKey
	host    *audit.NoteSigner
	ca      *audit.NoteSigner
	reg     *prometheus.Registry
	rec     *auditRecords
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
	f.reg, f.rec = prometheus.NewRegistry(), &auditRecords{}
	l, err := newCALog(f.path, caOrigin, f.hostKey, f.rec, f.reg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	f.l = l
}

func (f *caLogFixture) observe(t *testing.T, signer *audit.NoteSigner, tree *testtlog.Tree) {
	t.Helper()
	_, held := f.l.Cosigned()
	note, proof := tree.Signed(t, caOrigin, signer, held)
	f.l.observe(t.Context(), caCheckpoint{witnessKey: signer.VerifierKey(), note: note, proof: proof,
		hostKey: f.host.VerifierKey()})
}

// cosigned checks that the CA checkpoint held is tree's, signed by the CA and by the host.
func (f *caLogFixture) cosigned(t *testing.T, tree *testtlog.Tree) {
	t.Helper()
	note, size := f.l.Cosigned()
	if size != tree.Size() {
		t.Fatalf("cosigned size %d, want %d", size, tree.Size())
	}
	caV, _ := audit.ParseVerifierKey(f.ca.VerifierKey())
	hostV, _ := audit.ParseVerifierKey(f.host.VerifierKey())
	if _, c, err := audit.OpenCheckpoint(note, caV, hostV); err != nil || c.Size != tree.Size() {
		t.Fatalf("cosigned checkpoint: %v (size %d)", err, c.Size)
	}
}

func (f *caLogFixture) refused(t *testing.T, reason string) {
	t.Helper()
	if got := f.rec.caRefusals(); len(got) != 1 || got[0].Reason != reason || got[0].Origin != caOrigin {
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
	tree := &testtlog.Tree{}
	tree.Add(t, 5, "r")
	f.observe(t, f.ca, tree)
	f.cosigned(t, tree)
	tree.Add(t, 12, "r")
	f.observe(t, f.ca, tree)
	f.cosigned(t, tree)
	f.reopen(t)
	f.cosigned(t, tree)
	tree.Add(t, 1, "r")
	f.observe(t, f.ca, tree)
	f.cosigned(t, tree)
	// Witness calls overlap (the log's rounds, witnessIdle): both cosign, readers never
	// see half a state.
	tree.Add(t, 3, "r")
	note, proof := tree.Signed(t, caOrigin, f.ca, tree.Size()-3)
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			f.l.observe(t.Context(), caCheckpoint{witnessKey: f.ca.VerifierKey(), note: note, proof: proof, hostKey: f.host.VerifierKey()})
		})
		wg.Go(func() {
			if msg, size := f.l.Cosigned(); msg == nil || size == 0 {
				t.Error("no CA checkpoint while one is replaced")
			}
		})
	}
	wg.Wait()
	f.cosigned(t, tree)
	if got := f.rec.caRefusals(); len(got) != 0 {
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
		next   func(t *testing.T, f *caLogFixture) (*audit.NoteSigner, *testtlog.Tree)
		reason string
	}{
		{name: "rewritten", reason: caRefusedInconsistent, next: func(t *testing.T, f *caLogFixture) (*audit.NoteSigner, *testtlog.Tree) {
			other := &testtlog.Tree{}
			other.Add(t, 9, "rewritten")
			return f.ca, other
		}},
		{name: "cut", reason: caRefusedInconsistent, next: func(t *testing.T, f *caLogFixture) (*audit.NoteSigner, *testtlog.Tree) {
			cut := &testtlog.Tree{}
			cut.Add(t, 3, "r")
			return f.ca, cut
		}},
		{name: "another key", reason: caRefusedKey, next: func(t *testing.T, f *caLogFixture) (*audit.NoteSigner, *testtlog.Tree) {
			tree := &testtlog.Tree{}
			tree.Add(t, 9, "r")
			return noteSigner(t, caOrigin), tree
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newCALogFixture(t)
			tree := &testtlog.Tree{}
			tree.Add(t, 5, "r")
			f.observe(t, f.ca, tree)
			signer, next := tc.next(t, f)
			f.observe(t, signer, next)
			f.refused(t, tc.reason)
			if _, size := f.l.Cosigned(); size != 5 {
				t.Errorf("held size %d, want 5", size)
			}
			// A consistent one afterwards changes nothing: the refusal sticks.
			tree.Add(t, 2, "r")
			f.observe(t, f.ca, tree)
			f.refused(t, tc.reason)
			var st caAuditState
			if err := json.Unmarshal(readFile(t, f.path), &st); err != nil || st.Refused != tc.reason {
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
	tree := &testtlog.Tree{}
	tree.Add(t, 4, "r")
	f.observe(t, f.ca, tree)
	tree.Add(t, 4, "r")
	other, proof := tree.Signed(t, "example.org/host/b/audit", f.ca, 4)
	f.l.observe(t.Context(), caCheckpoint{witnessKey: f.ca.VerifierKey(), note: other, proof: proof, hostKey: f.host.VerifierKey()})
	f.l.observe(t.Context(), caCheckpoint{witnessKey: f.ca.VerifierKey(), note: []byte("garbage"), hostKey: f.host.VerifierKey()})
	if _, size := f.l.Cosigned(); size != 4 {
		t.Errorf("held size %d, want 4", size)
	}
	if got := f.rec.caRefusals(); len(got) != 0 {
		t.Errorf("refusals %+v", got)
	}
}
