package audit_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/mod/sumdb/tlog"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/metrictest"
)

// reference computes the stored hashes and root of a log's lines with tlog itself.
func reference(t testing.TB, ls [][]byte) ([]tlog.Hash, tlog.HashReaderFunc) {
	t.Helper()
	var stored []tlog.Hash
	hr := tlog.HashReaderFunc(func(idx []int64) ([]tlog.Hash, error) {
		out := make([]tlog.Hash, len(idx))
		for j, x := range idx {
			out[j] = stored[x]
		}
		return out, nil
	})
	for i, l := range ls {
		hs, err := tlog.StoredHashes(int64(i), l, hr)
		if err != nil {
			t.Fatal(err)
		}
		stored = append(stored, hs...)
	}
	return stored, hr
}

func refRoot(t testing.TB, ls [][]byte) tlog.Hash {
	t.Helper()
	_, hr := reference(t, ls)
	h, err := tlog.TreeHash(int64(len(ls)), hr)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func hashBytes(hs []tlog.Hash) []byte {
	var b []byte
	for _, h := range hs {
		b = append(b, h[:]...)
	}
	return b
}

// TestTreeMatchesTlog: the writer's tree, hash file and proofs are tlog's, for sizes
// around powers of two.
func TestTreeMatchesTlog(t *testing.T) {
	t.Parallel()
	for _, n := range []int{1, 2, 3, 7, 8, 9, 64, 100} {
		path := tempLog(t)
		l := start(t, audit.Config{Path: path, Origin: testOrigin, Signer: newKey(t), CheckpointInterval: time.Hour})
		appendSync(t, l, 0, n)
		if err := l.Checkpoint(t.Context()); err != nil {
			t.Fatal(err)
		}
		ls := lines(readFile(t, path))
		stored, _ := reference(t, ls)
		note, c := l.Latest()
		if note == nil || c.Size != uint64(n) || c.Hash != refRoot(t, ls) {
			t.Fatalf("n=%d: Latest = %+v, want size %d and tlog's root", n, c, n)
		}
		for _, idx := range []int{0, n / 2, n - 1} {
			p, err := l.ProveInclusion(uint64(idx), uint64(n))
			if err != nil {
				t.Fatal(err)
			}
			if err := tlog.CheckRecord(p, int64(n), c.Hash, int64(idx), tlog.RecordHash(ls[idx])); err != nil {
				t.Errorf("n=%d: inclusion proof of %d: %v", n, idx, err)
			}
			if idx == 0 {
				continue
			}
			old := refRoot(t, ls[:idx])
			tp, err := l.ProveConsistency(uint64(idx), uint64(n))
			if err != nil {
				t.Fatal(err)
			}
			if err := tlog.CheckTree(tp, int64(n), c.Hash, int64(idx), old); err != nil {
				t.Errorf("n=%d: consistency proof from %d: %v", n, idx, err)
			}
		}
		if _, err := l.ProveInclusion(uint64(n), uint64(n)); err == nil {
			t.Errorf("n=%d: a proof of a record past the end must fail", n)
		}
		if _, err := l.ProveConsistency(1, uint64(n)+1); err == nil {
			t.Errorf("n=%d: a proof to a size past the end must fail", n)
		}
		if err := l.stop(); err != nil {
			t.Fatal(err)
		}
		if got := readFile(t, path+".hashes"); !bytes.Equal(got, hashBytes(stored)) {
			t.Errorf("n=%d: hash file differs from tlog's stored hashes", n)
		}
	}
}

// TestTreeReopen: the hash file is derived data; whatever a crash or an editor left in
// it, the reopened log's tree is right.
func TestTreeReopen(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		signer bool
		damage func(t *testing.T, path string)
	}{
		{"intact", true, func(*testing.T, string) {}},
		{"intact, no checkpoints", false, func(*testing.T, string) {}},
		{"cut short", true, func(t *testing.T, path string) {
			if err := os.Truncate(path+".hashes", 100); err != nil {
				t.Fatal(err)
			}
		}},
		{"garbage appended", true, func(t *testing.T, path string) {
			f, err := os.OpenFile(path+".hashes", os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			_, _ = f.Write(bytes.Repeat([]byte{7}, 45))
			_ = f.Close()
		}},
		{"zeroed", true, func(t *testing.T, path string) {
			st, err := os.Stat(path + ".hashes")
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path+".hashes", make([]byte, st.Size()), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"removed", true, func(t *testing.T, path string) {
			if err := os.Remove(path + ".hashes"); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := tempLog(t)
			key := newKey(t)
			cfg := audit.Config{Path: path, CheckpointInterval: time.Hour}
			if tc.signer {
				cfg.Origin, cfg.Signer = testOrigin, key
			}
			appendN(t, cfg, 0, 37)
			tc.damage(t, path)
			appendN(t, cfg, 37, 20)
			ls := lines(readFile(t, path))
			stored, _ := reference(t, ls)
			if got := readFile(t, path+".hashes"); !bytes.Equal(got, hashBytes(stored)) {
				t.Errorf("hash file after reopen differs from tlog's (%d bytes, want %d)", len(got), len(stored)*32)
			}
			if tc.signer {
				_, err := audit.VerifyLog(path, audit.VerifyOptions{Checkpoint: readFile(t, path+".checkpoint"), Key: verifierKey(t, key)})
				if err != nil {
					t.Errorf("VerifyLog: %v", err)
				}
			}
		})
	}
}

// appendN opens cfg, appends n records numbered from first and stops the log.
func appendN(t testing.TB, cfg audit.Config, first, n int) {
	t.Helper()
	l := start(t, cfg)
	appendSync(t, l, first, n)
	if err := l.stop(); err != nil {
		t.Fatal(err)
	}
}

// TestCheckpointSchedule: without any call to Checkpoint, the writer signs every
// CheckpointRecords records and every CheckpointInterval while the log grows.
func TestCheckpointSchedule(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		path := tempLog(t)
		reg := prometheus.NewRegistry()
		w := newTestWitness(t)
		l := start(t, audit.Config{Path: path, Origin: testOrigin, Signer: newKey(t), Witness: w, Registerer: reg,
			CheckpointRecords: 10, CheckpointInterval: time.Minute})
		appendSync(t, l, 0, 25)
		synctest.Wait()
		if _, c := l.Latest(); c.Size != 25 {
			t.Fatalf("after 25 records, latest checkpoint has size %d, want 25 (kicked by the count)", c.Size)
		}
		if got := metrictest.Value(t, reg, "agentmesh_audit_checkpoints_total", "result", "witnessed"); got < 1 {
			t.Errorf("checkpoints_total{witnessed} = %v, want >= 1", got)
		}
		if got := gauge(t, reg, "agentmesh_audit_checkpoint_lag_seconds"); got != 0 {
			t.Errorf("checkpoint_lag_seconds = %v with everything witnessed, want 0", got)
		}
		// Fewer than CheckpointRecords more: the interval signs them.
		appendSync(t, l, 25, 3)
		synctest.Wait()
		if _, c := l.Latest(); c.Size != 25 {
			t.Fatalf("latest = %d before the interval, want 25", c.Size)
		}
		time.Sleep(time.Minute) //nolint:forbidigo // synctest: advances the bubble's clock
		synctest.Wait()
		if _, c := l.Latest(); c.Size != 28 {
			t.Fatalf("latest = %d after the interval, want 28", c.Size)
		}
		if got := gauge(t, reg, "agentmesh_audit_witnessed_size"); got != 28 {
			t.Errorf("witnessed_size = %v, want 28", got)
		}
		cos := readFile(t, path+".cosigned")
		wv, _ := audit.ParseVerifierKey(w.signer.VerifierKey())
		lv, _ := audit.ParseVerifierKey(w.view().Key)
		if _, c, err := audit.OpenCheckpoint(cos, lv, wv); err != nil || c.Size != 28 {
			t.Errorf(".cosigned = %v, %v; want size 28 signed by the log and the witness", c, err)
		}
	})
}

// TestCheckpointLag: while the witness is away, the lag is the age of the oldest record
// it has not cosigned.
func TestCheckpointLag(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		reg := prometheus.NewRegistry()
		l := start(t, audit.Config{Path: tempLog(t), Origin: testOrigin, Signer: newKey(t), Witness: &failingWitness{}, Registerer: reg,
			CheckpointInterval: 10 * time.Second})
		appendSync(t, l, 0, 1)
		time.Sleep(30 * time.Second) //nolint:forbidigo // synctest: advances the bubble's clock
		synctest.Wait()
		if got := gauge(t, reg, "agentmesh_audit_checkpoint_lag_seconds"); got != 30 {
			t.Errorf("checkpoint_lag_seconds = %v, want 30", got)
		}
		if got := metrictest.Value(t, reg, "agentmesh_audit_checkpoints_total", "result", "error"); got < 3 {
			t.Errorf("checkpoints_total{error} = %v, want one per tick", got)
		}
	})
}

// failingWitness is a witness that cannot be reached; it counts the attempts.
type failingWitness struct{ calls atomic.Int64 }

func (w *failingWitness) Witness(context.Context, audit.WitnessRequest) ([]byte, error) {
	w.calls.Add(1)
	return nil, errors.New("witness unreachable")
}

// TestWitnessFailureBackoff: after a failed exchange, the records that keep coming are
// signed but the witness is tried again only at the next interval.
func TestWitnessFailureBackoff(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		reg := prometheus.NewRegistry()
		w := &failingWitness{}
		l := start(t, audit.Config{Path: tempLog(t), Origin: testOrigin, Signer: newKey(t), Witness: w, Registerer: reg,
			CheckpointRecords: 10, CheckpointInterval: time.Minute})
		for i := range 10 {
			appendSync(t, l, 10*i, 10)
			synctest.Wait()
		}
		if _, c := l.Latest(); c.Size != 100 {
			t.Errorf("latest checkpoint = %d, want 100: kicks still sign", c.Size)
		}
		if got := w.calls.Load(); got != 1 {
			t.Errorf("witness tried %d times before the interval, want 1", got)
		}
		time.Sleep(time.Minute) //nolint:forbidigo // synctest: advances the bubble's clock
		synctest.Wait()
		if got := w.calls.Load(); got != 2 {
			t.Errorf("witness tried %d times after the interval, want 2", got)
		}
	})
}
