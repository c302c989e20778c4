package siem_test

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agentmesh/agentmesh/audit"
)

// chain writes record lines as a log's writer would: seq, type and the hash chain (the
// hash is of the line's content, not audit's exact one; the sink does not check it).
type chain struct{ prev string }

// write appends the lines of seqs [first, last] to file, of type "t" + (seq + tag).
func (c *chain) write(t testing.TB, file string, first, last, tag uint64) {
	t.Helper()
	var b strings.Builder
	for seq := first; seq <= last; seq++ {
		body := fmt.Sprintf(`{"seq":%d,"time":"2026-12-07T23:00:00Z","type":"t%d","prev":"%s"`, seq, seq+tag, c.prev)
		sum := sha256.Sum256([]byte(body))
		c.prev = hex.EncodeToString(sum[:])
		fmt.Fprintf(&b, "%s,\"hash\":\"%s\"}\n", body, c.prev)
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

// writeLines starts a chain at seq first.
func writeLines(t testing.TB, file string, first, last uint64) *chain {
	t.Helper()
	c := &chain{prev: strings.Repeat("0", 64)}
	c.write(t, file, first, last, 0)
	return c
}

// segmentedLog writes a log of two segments, seqs 1-3 and 4-6, and an active file, 7-8.
func segmentedLog(t testing.TB) (string, *chain) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	c := writeLines(t, audit.SegmentName(path, 1), 1, 3)
	c.write(t, audit.SegmentName(path, 4), 4, 6, 0)
	c.write(t, path, 7, 8, 0)
	return path, c
}

// TestSinkSegments: the sink reads a log's segments in order, then the active file, and
// follows it through a rotation (renamed to a segment, a new active file after it).
func TestSinkSegments(t *testing.T) {
	t.Parallel()
	path, c := segmentedLog(t)
	r := newReceiver(t)
	reg, _ := runSink(t, r, path, nil)
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
	c.write(t, path, 9, 9, 0)
	if err := os.Rename(path, audit.SegmentName(path, 7)); err != nil {
		t.Fatal(err)
	}
	c.write(t, path, 10, 11, 0)
	expect(9, 11)
	if v := metric(t, reg, "agentmesh_audit_siem_errors_total"); v != 0 {
		t.Errorf("errors_total = %v: every line follows the one before", v)
	}
}

// TestSinkCutTail: the log's writer cuts a batch whose fsync failed off the active file
// and writes it again, under the same seqs with new times and hashes; the sink, which had
// read the batch, goes back to the first line that changed and sends the records as they
// are now, however far the rewrite has gone when it looks.
func TestSinkCutTail(t *testing.T) {
	t.Parallel()
	for _, rewritten := range []uint64{0, 1, 3} {
		t.Run(fmt.Sprint(rewritten), func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), "audit.log")
			c := writeLines(t, path, 1, 3)
			st, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			durable := *c
			c.write(t, path, 4, 5, 0)
			r := newReceiver(t)
			reg, _ := runSink(t, r, path, nil)
			for seq := uint64(1); seq <= 5; seq++ {
				if m := r.next(t); m.seq != seq {
					t.Fatalf("got seq %d, want %d", m.seq, seq)
				}
			}
			if err := os.Truncate(path, st.Size()); err != nil {
				t.Fatal(err)
			}
			if rewritten > 0 {
				durable.write(t, path, 4, 3+rewritten, 10)
			}
			durable.write(t, path, 4+rewritten, 6, 10)
			for seq := uint64(4); seq <= 6; seq++ {
				if m := r.next(t); m.seq != seq || m.msgID != fmt.Sprintf("t%d", seq+10) {
					t.Fatalf("got seq %d (MSGID %s), want %d (t%d)", m.seq, m.msgID, seq, seq+10)
				}
			}
			if v := metric(t, reg, "agentmesh_audit_siem_errors_total"); v != 0 {
				t.Errorf("errors_total = %v", v)
			}
		})
	}
}

// TestSinkTamperedSegment: a log with a line deleted from a segment. The sink sends
// every line in its place, numbered by its position as audit.Scan and audit verify
// number them (verify names the gap), counts the break in the chain once, and does not
// go back and forth over the active file, whose lines no longer match their seqs.
func TestSinkTamperedSegment(t *testing.T) {
	t.Parallel()
	path, _ := segmentedLog(t)
	seg := audit.SegmentName(path, 4)
	b, err := os.ReadFile(seg)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitAfter(string(b), "\n")
	if err := os.WriteFile(seg, []byte(lines[0]+lines[2]), 0o600); err != nil { // without seq 5
		t.Fatal(err)
	}
	r := newReceiver(t)
	reg, _ := runSink(t, r, path, nil)
	for seq := uint64(1); seq <= 7; seq++ {
		want := seq
		if seq >= 5 {
			want = seq + 1 // the line written as seq+1 is now at seq
		}
		if m := r.next(t); m.seq != seq || m.msgID != fmt.Sprintf("t%d", want) {
			t.Fatalf("got seq %d (MSGID %s), want %d (t%d)", m.seq, m.msgID, seq, want)
		}
	}
	if v := metric(t, reg, "agentmesh_audit_siem_errors_total"); v != 1 {
		t.Errorf("errors_total = %v, want 1: one break in the chain", v)
	}
}
