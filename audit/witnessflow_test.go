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

// TestWitnessRefusesRewrite: a log rewritten consistently or cut while it was stopped
// (chain recomputed, its own checkpoint and hashes deleted) is refused at its next
// checkpoint, whether or not it kept its .cosigned file and whether or not it grew since;
// the log says so and counts it, and the witness keeps what it held.
func TestWitnessRefusesRewrite(t *testing.T) {
	t.Parallel()
	rewrite := func(ls [][]byte) [][]byte {
		ls[5] = bytes.Replace(ls[5], []byte(`"result":"ok"`), []byte(`"result":"no"`), 1)
		return rechain(t, ls, 5)
	}
	cut := func(ls [][]byte) [][]byte { return ls[:25] }
	cases := []struct {
		name         string
		tamper       func([][]byte) [][]byte
		keepCosigned bool
		grow         int
	}{
		{"rewritten, grown, .cosigned kept", rewrite, true, 1},
		{"rewritten, grown, .cosigned deleted", rewrite, false, 1},
		{"rewritten, same size, .cosigned kept", rewrite, true, 0},
		{"rewritten, same size, .cosigned deleted", rewrite, false, 0},
		{"cut, .cosigned kept", cut, true, 0},
		{"cut, .cosigned deleted", cut, false, 0},
		{"cut and grown past, .cosigned kept", cut, true, 10},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := newTestWitness(t)
			path, key := witnessedLog(t, w, 30, 10)
			if err := os.WriteFile(path, join(tc.tamper(lines(readFile(t, path)))), 0o600); err != nil {
				t.Fatal(err)
			}
			remove := []string{".checkpoint", ".hashes"}
			if !tc.keepCosigned {
				remove = append(remove, ".cosigned")
			}
			for _, suffix := range remove {
				if err := os.Remove(path + suffix); err != nil {
					t.Fatal(err)
				}
			}
			reg := prometheus.NewRegistry()
			l := start(t, audit.Config{Path: path, Origin: testOrigin, Signer: key, Witness: w, Registerer: reg, CheckpointInterval: time.Hour})
			if tc.grow > 0 {
				appendSync(t, l, 0, tc.grow)
			}
			if err := l.Checkpoint(t.Context()); !errors.Is(err, audit.ErrInconsistent) {
				t.Fatalf("Checkpoint = %v, want ErrInconsistent", err)
			}
			// The round at start may have been refused already.
			if got := metrictest.Value(t, reg, "agentmesh_audit_checkpoints_total", "result", "refused"); got < 1 {
				t.Errorf("checkpoints_total{refused} = %v, want >= 1", got)
			}
			if _, c, _ := audit.OpenCheckpoint([]byte(w.view().Latest), mustVerifier(t, w.view().Key)); c.Size != 30 {
				t.Errorf("the witness must keep its checkpoint of 30, holds %d", c.Size)
			}
			w.mu.Lock()
			defer w.mu.Unlock()
			if w.refused == 0 {
				t.Error("the witness never saw the inconsistent checkpoint: it could not alert")
			}
		})
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
