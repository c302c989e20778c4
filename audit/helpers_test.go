package audit_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/audit"
)

// running is a Log with its Run goroutine; stop cancels Run and returns its result.
type running struct {
	*audit.Log
	stop func() error
}

// start opens cfg and runs the log until stop or the end of the test.
func start(t testing.TB, cfg audit.Config) running {
	t.Helper()
	l, err := audit.Open(cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	var (
		stopped bool
		result  error
	)
	stop := func() error {
		if !stopped {
			cancel()
			result, stopped = <-done, true
		}
		return result
	}
	t.Cleanup(func() { _ = stop() })
	return running{Log: l, stop: stop}
}

func tempLog(t testing.TB) string {
	t.Helper()
	return filepath.Join(t.TempDir(), "audit.log")
}

func handshake(i int) audit.Handshake {
	return audit.Handshake{
		Direction: "inbound", Result: "ok", Transport: "tls",
		PeerID:   "spiffe://example.org/agent/a",
		PeerAddr: "10.0.0.1:" + string(rune('0'+i%10)), Duration: time.Duration(i) * time.Millisecond,
	}
}

// writeLog writes n handshake records to a new file and returns its contents.
func writeLog(t testing.TB, n int) []byte {
	t.Helper()
	path := tempLog(t)
	l := start(t, audit.Config{Path: path})
	for i := range n {
		if err := l.Append(handshake(i)); err != nil {
			t.Fatalf("Append: %v", err)
		}
	}
	if err := l.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	return readFile(t, path)
}

func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func verifyFile(t testing.TB, path string) (int, error) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }() // read only
	return audit.Verify(f)
}

// lines splits a log into lines without their newlines.
func lines(b []byte) [][]byte {
	return bytes.Split(bytes.TrimSuffix(b, []byte("\n")), []byte("\n"))
}

func join(ls [][]byte) []byte {
	if len(ls) == 0 {
		return nil
	}
	return append(bytes.Join(ls, []byte("\n")), '\n')
}

// suffixLen is len(`,"hash":"<64 hex>"}`), from the format in the contract.
const suffixLen = len(`,"hash":"`) + 64 + len(`"}`)

// rehash recomputes the hash of a record line as the contract defines it: SHA-256 of the
// line without its `,"hash":"…"` suffix.
func rehash(line []byte) []byte {
	body := line[:len(line)-suffixLen]
	sum := sha256.Sum256(append(append([]byte{}, body...), '}'))
	out := append([]byte{}, body...)
	out = append(out, `,"hash":"`...)
	out = append(out, hex.EncodeToString(sum[:])...)
	return append(out, `"}`...)
}

// appendSync appends n records numbered from first and waits until they are durable.
func appendSync(t testing.TB, l running, first, n int) {
	t.Helper()
	for i := range n {
		if err := l.Append(handshake(first + i)); err != nil {
			t.Fatalf("Append: %v", err)
		}
	}
	if err := l.Sync(t.Context()); err != nil {
		t.Fatalf("Sync: %v", err)
	}
}
