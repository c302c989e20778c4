package siem_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agentmesh/agentmesh/audit"
)

// writeLines writes the lines of seqs [first, last] to file, as a log's writer would
// (the sink reads lines by position; it does not check them).
func writeLines(t testing.TB, file string, first, last uint64) {
	t.Helper()
	var b strings.Builder
	for seq := first; seq <= last; seq++ {
		fmt.Fprintf(&b, `{"seq":%d,"time":"2026-12-07T23:00:00Z","type":"t%d"}`+"\n", seq, seq)
	}
	f, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(b.String()); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestSinkSegments: the sink reads a log's segments in order, then the active file, and
// follows it through a rotation (renamed to a segment, a new active file after it).
func TestSinkSegments(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "audit.log")
	writeLines(t, audit.SegmentName(path, 1), 1, 3)
	writeLines(t, audit.SegmentName(path, 4), 4, 6)
	writeLines(t, path, 7, 8)
	r := newReceiver(t)
	runSink(t, r, path, nil)
	expect := func(first, last uint64) {
		t.Helper()
		for seq := first; seq <= last; seq++ {
			m := r.next(t)
			if m.seq != seq || m.msgID != fmt.Sprintf("t%d", seq) {
				t.Fatalf("got seq %d (MSGID %s), want %d", m.seq, m.msgID, seq)
			}
		}
	}
	expect(1, 8)
	// A rotation while the sink follows the active file: its last lines first, then
	// the new file.
	writeLines(t, path, 9, 9)
	if err := os.Rename(path, audit.SegmentName(path, 7)); err != nil {
		t.Fatal(err)
	}
	writeLines(t, path, 10, 11)
	expect(9, 11)
}
