package audit_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/audit"
)

func TestRoundTrip(t *testing.T) {
	t.Parallel()
	path := tempLog(t)
	now := time.Date(2025, 6, 1, 12, 0, 0, 123456789, time.FixedZone("CEST", 2*3600))
	l := start(t, audit.Config{Path: path, Now: func() time.Time { return now }})
	events := []audit.Event{
		handshake(1),
		&audit.Rotation{SPIFFEID: "spiffe://example.org/host/a", Trigger: "time", Actor: audit.Actor{Initiator: "rotator"},
			OldSerial: "01", NewSerial: "02", Result: "ok", Started: now, Finished: now},
		audit.Connection{Direction: "outbound", Target: "10.0.0.2:443", BytesIn: 10, BytesOut: 20},
	}
	for _, e := range events {
		if err := l.Append(e); err != nil {
			t.Fatalf("Append(%T): %v", e, err)
		}
	}
	if err := l.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}

	ls := lines(readFile(t, path))
	if len(ls) != len(events) {
		t.Fatalf("got %d lines, want %d", len(ls), len(events))
	}
	prev := strings.Repeat("0", 64)
	for i, line := range ls {
		var rec map[string]any
		if err := json.Unmarshal(line, &rec); err != nil {
			t.Fatalf("line %d is not JSON: %v", i+1, err)
		}
		if keys := topLevelKeys(t, line); !uniqueKeys(keys) {
			t.Errorf("line %d has duplicate keys: %v", i+1, keys)
		}
		if got, want := rec["seq"], float64(i+1); got != want {
			t.Errorf("line %d: seq = %v, want %v", i+1, got, want)
		}
		if got, want := rec["type"], events[i].Kind(); got != want {
			t.Errorf("line %d: type = %v, want %v", i+1, got, want)
		}
		if got, want := rec["time"], "2025-06-01T10:00:00.123456789Z"; got != want {
			t.Errorf("line %d: time = %v, want %v (UTC)", i+1, got, want)
		}
		if rec["prev"] != prev {
			t.Errorf("line %d: prev = %v, want %v", i+1, rec["prev"], prev)
		}
		prev = rec["hash"].(string)
	}
	// Event fields are flat in the record.
	var hs struct {
		PeerID   string `json:"peer_id"`
		Duration int64  `json:"duration_ns"`
	}
	if err := json.Unmarshal(ls[0], &hs); err != nil || hs.PeerID != "spiffe://example.org/agent/a" || hs.Duration != int64(time.Millisecond) {
		t.Errorf("handshake fields = %+v, %v", hs, err)
	}
	if n, err := verifyFile(t, path); n != 3 || err != nil {
		t.Errorf("Verify = %d, %v; want 3, nil", n, err)
	}
}

func TestReopenContinuesChain(t *testing.T) {
	t.Parallel()
	path := tempLog(t)
	for round := range 3 {
		l := start(t, audit.Config{Path: path})
		for i := range 2 {
			if err := l.Append(handshake(i)); err != nil {
				t.Fatal(err)
			}
		}
		if err := l.stop(); err != nil {
			t.Fatalf("round %d: Run: %v", round, err)
		}
	}
	if n, err := verifyFile(t, path); n != 6 || err != nil {
		t.Errorf("Verify = %d, %v; want 6, nil", n, err)
	}
}

func TestTornTail(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		tail func(last []byte) []byte // appended after 3 good records
	}{
		{name: "half a record", tail: func(last []byte) []byte { return last[:len(last)/2] }},
		{name: "whole record without newline", tail: func(last []byte) []byte { return last }},
		{name: "one byte", tail: func([]byte) []byte { return []byte("{") }},
		{name: "long garbage", tail: func([]byte) []byte { return bytes.Repeat([]byte("x"), 100<<10) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			good := writeLog(t, 4)
			ls := lines(good)
			path := tempLog(t)
			if err := os.WriteFile(path, append(join(ls[:3]), tc.tail(ls[3])...), 0o600); err != nil {
				t.Fatal(err)
			}
			n, err := verifyFile(t, path)
			if ve, ok := errors.AsType[*audit.VerifyError](err); !ok || n != 3 || ve.Line != 4 || ve.Seq != 4 {
				t.Fatalf("Verify before reopen = %d, %v; want 3 and a VerifyError at line 4", n, err)
			}

			l := start(t, audit.Config{Path: path})
			if err := l.Append(handshake(9)); err != nil {
				t.Fatal(err)
			}
			if err := l.stop(); err != nil {
				t.Fatal(err)
			}
			if n, err := verifyFile(t, path); n != 4 || err != nil {
				t.Errorf("Verify after reopen = %d, %v; want 4, nil", n, err)
			}
		})
	}
}

func TestTornOnlyLine(t *testing.T) {
	t.Parallel()
	path := tempLog(t)
	if err := os.WriteFile(path, []byte(`{"seq":1,"ti`), 0o600); err != nil {
		t.Fatal(err)
	}
	l := start(t, audit.Config{Path: path})
	if err := l.Append(handshake(0)); err != nil {
		t.Fatal(err)
	}
	if err := l.stop(); err != nil {
		t.Fatal(err)
	}
	if n, err := verifyFile(t, path); n != 1 || err != nil {
		t.Errorf("Verify = %d, %v; want 1, nil", n, err)
	}
}

func TestOpenErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	corrupt := filepath.Join(dir, "corrupt.log")
	if err := os.WriteFile(corrupt, []byte("not a record\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		cfg     audit.Config
		wantErr error // nil: any error
	}{
		{name: "empty path", cfg: audit.Config{}},
		{name: "missing parent", cfg: audit.Config{Path: filepath.Join(dir, "nope", "audit.log")}, wantErr: os.ErrNotExist},
		{name: "corrupt last record", cfg: audit.Config{Path: corrupt}, wantErr: audit.ErrCorrupt},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			l, err := audit.Open(tc.cfg)
			if err == nil || (tc.wantErr != nil && !errors.Is(err, tc.wantErr)) {
				t.Fatalf("Open = %v, %v; want error %v", l, err, tc.wantErr)
			}
		})
	}
}

func TestFileMode(t *testing.T) {
	t.Parallel()
	path := tempLog(t)
	start(t, audit.Config{Path: path})
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := st.Mode().Perm(); got != 0o600 {
		t.Errorf("mode = %v, want 0600", got)
	}
}

func TestConcurrentAppend(t *testing.T) {
	t.Parallel()
	const writers, each = 8, 200
	path := tempLog(t)
	// A tiny queue makes Append block often, so "never drops" is exercised.
	l := start(t, audit.Config{Path: path, QueueSize: 2})
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				if err := l.Append(handshake(w*each + i)); err != nil {
					t.Errorf("Append: %v", err)
					return
				}
				if i%50 == 0 {
					if err := l.Sync(t.Context()); err != nil {
						t.Errorf("Sync: %v", err)
					}
				}
			}
		})
	}
	wg.Wait()
	if err := l.stop(); err != nil {
		t.Fatal(err)
	}
	if n, err := verifyFile(t, path); n != writers*each || err != nil {
		t.Errorf("Verify = %d, %v; want %d, nil", n, err, writers*each)
	}
}

func TestSyncMakesRecordsDurable(t *testing.T) {
	t.Parallel()
	path := tempLog(t)
	l := start(t, audit.Config{Path: path})
	for i := 1; i <= 5; i++ {
		if err := l.Append(handshake(i)); err != nil {
			t.Fatal(err)
		}
		if err := l.Sync(t.Context()); err != nil {
			t.Fatal(err)
		}
		// Read through a separate descriptor while the log is open.
		if n, err := verifyFile(t, path); n != i || err != nil {
			t.Fatalf("after Sync %d: Verify = %d, %v", i, n, err)
		}
	}
	if err := l.Sync(t.Context()); err != nil { // nothing new: no fsync needed, still nil
		t.Fatal(err)
	}
}

func TestAfterShutdown(t *testing.T) {
	t.Parallel()
	l := start(t, audit.Config{Path: tempLog(t)})
	if err := l.Err(); err != nil {
		t.Fatalf("Err while healthy = %v", err)
	}
	if err := l.Append(handshake(0)); err != nil {
		t.Fatal(err)
	}
	if err := l.stop(); err != nil {
		t.Fatal(err)
	}
	if err := l.Append(handshake(1)); !errors.Is(err, audit.ErrUnavailable) {
		t.Errorf("Append after shutdown = %v, want ErrUnavailable", err)
	}
	if err := l.Err(); !errors.Is(err, audit.ErrUnavailable) {
		t.Errorf("Err after shutdown = %v, want ErrUnavailable", err)
	}
	// Everything appended before shutdown was committed by Run.
	if err := l.Sync(t.Context()); err != nil {
		t.Errorf("Sync after clean shutdown = %v, want nil", err)
	}
	if err := l.Run(t.Context()); err == nil {
		t.Error("second Run = nil, want error")
	}
}

func TestSyncContextCanceled(t *testing.T) {
	t.Parallel()
	l, err := audit.Open(audit.Config{Path: tempLog(t)}) // Run is never started
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := l.Sync(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Sync = %v, want context.Canceled", err)
	}
}

// TestAppendBlocksWhenFull shows that a full queue makes Append wait rather than drop.
func TestAppendBlocksWhenFull(t *testing.T) {
	t.Parallel()
	path := tempLog(t)
	synctest.Test(t, func(t *testing.T) {
		l, err := audit.Open(audit.Config{Path: path, QueueSize: 1})
		if err != nil {
			t.Fatal(err)
		}
		if err := l.Append(handshake(0)); err != nil { // fills the queue
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- l.Append(handshake(1)) }()
		synctest.Wait()
		select {
		case err := <-done:
			t.Fatalf("Append on a full queue returned %v before the writer ran", err)
		default:
		}

		ctx, cancel := context.WithCancel(t.Context())
		ran := make(chan error, 1)
		go func() { ran <- l.Run(ctx) }()
		if err := <-done; err != nil {
			t.Fatalf("blocked Append = %v", err)
		}
		if err := l.Sync(t.Context()); err != nil {
			t.Fatal(err)
		}
		cancel()
		if err := <-ran; err != nil {
			t.Fatal(err)
		}
	})
	if n, err := verifyFile(t, path); n != 2 || err != nil {
		t.Errorf("Verify = %d, %v; want 2, nil", n, err)
	}
}

// TestWriteFailure uses /dev/full, where every write fails with ENOSPC, even as root,
// through a link so that the log's companion files go to a temporary directory.
func TestWriteFailure(t *testing.T) {
	t.Parallel()
	if _, err := os.Stat("/dev/full"); err != nil {
		t.Skip("no /dev/full on this system")
	}
	path := tempLog(t)
	if err := os.Symlink("/dev/full", path); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	l := start(t, audit.Config{Path: path, Registerer: reg})
	// The failure is only known at write time: the first Append is queued, and returns
	// nil, or the failure when the writer was quicker than Append's return.
	if err := l.Append(handshake(0)); err != nil && !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("first Append = %v, want nil or ENOSPC", err)
	}
	err := l.Sync(t.Context())
	if !errors.Is(err, audit.ErrUnavailable) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("Sync = %v, want ErrUnavailable wrapping ENOSPC", err)
	}
	if err := l.Err(); !errors.Is(err, audit.ErrUnavailable) {
		t.Errorf("Err = %v, want ErrUnavailable", err)
	}
	if err := l.Append(handshake(1)); !errors.Is(err, audit.ErrUnavailable) {
		t.Errorf("Append after failure = %v, want ErrUnavailable", err)
	}
	if err := l.Sync(t.Context()); !errors.Is(err, audit.ErrUnavailable) {
		t.Errorf("Sync after failure = %v, want ErrUnavailable", err)
	}
	if got := counter(t, reg, "agentmesh_audit_errors_total", "write"); got != 1 {
		t.Errorf("errors_total{op=write} = %v, want 1", got)
	}
	if err := l.stop(); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("Run = %v, want ENOSPC", err)
	}
}

// topLevelKeys lists the keys of a JSON object in order, duplicates included.
func topLevelKeys(t *testing.T, obj []byte) []string {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(obj))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		t.Fatalf("not an object: %s", obj)
	}
	var keys []string
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, fmt.Sprint(tok))
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			t.Fatal(err)
		}
	}
	return keys
}

func uniqueKeys(keys []string) bool {
	seen := map[string]bool{}
	for _, k := range keys {
		if seen[k] {
			return false
		}
		seen[k] = true
	}
	return true
}
