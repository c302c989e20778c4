package audit_test

import (
	"bytes"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/metrictest"
)

// TestWitnessConflict: a log that lost its record of what the witness holds (its
// .cosigned file) is told the witness's size, checks that checkpoint is its own prefix and
// retries from it.
func TestWitnessConflict(t *testing.T) {
	t.Parallel()
	w := newTestWitness(t)
	path, key := witnessedLog(t, w, 30, 10)
	if err := os.Remove(path + ".cosigned"); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	cfg := audit.Config{Path: path, Origin: testOrigin, Signer: key, Witness: w, Registerer: reg, CheckpointInterval: time.Hour}
	l := start(t, cfg)
	appendSync(t, l, 0, 5)
	if err := l.Checkpoint(t.Context()); err != nil {
		t.Fatalf("Checkpoint after a conflict = %v, want the retry to succeed", err)
	}
	if got := metrictest.Value(t, reg, "agentmesh_audit_checkpoints_total", "result", "conflict"); got != 1 {
		t.Errorf("checkpoints_total{conflict} = %v, want 1", got)
	}
	if w.view().History[len(w.view().History)-1].Size != 30 {
		t.Errorf("witness history = %+v, want 30 before 35", w.view().History)
	}
}

// TestWitnessRefusesRewrite: a log rewritten consistently while it was stopped (chain
// recomputed, kept checkpoints deleted) is refused at its next checkpoint, whether or not
// it kept its .cosigned file; the log says so and counts it.
func TestWitnessRefusesRewrite(t *testing.T) {
	t.Parallel()
	for _, keepCosigned := range []bool{true, false} {
		w := newTestWitness(t)
		path, key := witnessedLog(t, w, 30, 10)
		ls := lines(readFile(t, path))
		ls[5] = bytes.Replace(ls[5], []byte(`"result":"ok"`), []byte(`"result":"no"`), 1)
		ls = rechain(t, ls, 5)
		if err := os.WriteFile(path, join(ls), 0o600); err != nil {
			t.Fatal(err)
		}
		for _, suffix := range []string{".checkpoint", ".hashes"} {
			if err := os.Remove(path + suffix); err != nil {
				t.Fatal(err)
			}
		}
		if !keepCosigned {
			if err := os.Remove(path + ".cosigned"); err != nil {
				t.Fatal(err)
			}
		}
		reg := prometheus.NewRegistry()
		l := start(t, audit.Config{Path: path, Origin: testOrigin, Signer: key, Witness: w, Registerer: reg, CheckpointInterval: time.Hour})
		appendSync(t, l, 0, 1)
		if err := l.Checkpoint(t.Context()); !errors.Is(err, audit.ErrInconsistent) {
			t.Fatalf("keep .cosigned %v: Checkpoint of a rewritten log = %v, want ErrInconsistent", keepCosigned, err)
		}
		// The round at start may have been refused already.
		if got := metrictest.Value(t, reg, "agentmesh_audit_checkpoints_total", "result", "refused"); got < 1 {
			t.Errorf("keep .cosigned %v: checkpoints_total{refused} = %v, want >= 1", keepCosigned, got)
		}
		if _, c, _ := audit.OpenCheckpoint([]byte(w.view().Latest), mustVerifier(t, w.view().Key)); c.Size != 30 {
			t.Errorf("the witness must keep its checkpoint of 30, holds %d", c.Size)
		}
	}
}

func mustVerifier(t testing.TB, key string) *audit.NoteVerifier {
	t.Helper()
	v, err := audit.ParseVerifierKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return v
}
