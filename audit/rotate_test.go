package audit_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/audit"
)

// rotatedLog writes n records to a log rotated past 2000 bytes, in batches of 7.
func rotatedLog(t testing.TB, cfg audit.Config, first, n int) {
	t.Helper()
	l := start(t, cfg)
	for i := 0; i < n; i += 7 {
		appendSync(t, l, first+i, min(7, n-i))
	}
	if err := l.stop(); err != nil {
		t.Fatal(err)
	}
}

// allLines reads every record line of the log across its files, with Scan.
func allLines(t testing.TB, path string) [][]byte {
	t.Helper()
	var ls [][]byte
	err := audit.Scan(path, 1, func(seq uint64, line []byte) error {
		if seq != uint64(len(ls))+1 {
			t.Fatalf("Scan passed seq %d after %d lines", seq, len(ls))
		}
		ls = append(ls, bytes.Clone(line))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ls
}

// TestRotation: past MaxFileBytes the log continues in a new file; one chain and one tree
// span the segments, across a restart too.
func TestRotation(t *testing.T) {
	t.Parallel()
	path := tempLog(t)
	key := newKey(t)
	cfg := audit.Config{Path: path, MaxFileBytes: 2000, Origin: testOrigin, Signer: key, CheckpointInterval: time.Hour}
	rotatedLog(t, cfg, 0, 100)
	rotatedLog(t, cfg, 100, 10)

	segs, err := audit.Segments(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(segs) < 5 {
		t.Fatalf("%d files after 110 records of ~300 bytes with a 2000-byte limit", len(segs))
	}
	for _, s := range segs[:len(segs)-1] {
		first := lines(readFile(t, s.Path))[0]
		if !bytes.HasPrefix(first, []byte(`{"seq":`+itoa(s.First)+`,`)) {
			t.Errorf("segment %s starts with %.20s", s.Path, first)
		}
	}
	ls := allLines(t, path)
	if len(ls) != 110 {
		t.Fatalf("Scan found %d records, want 110", len(ls))
	}
	cp := readFile(t, path+".checkpoint")
	rep, err := audit.VerifyLog(path, audit.VerifyOptions{Checkpoint: cp, Key: verifierKey(t, key)})
	if err != nil || rep.Records != 110 || rep.Root != refRoot(t, ls) || rep.Checkpoint.Size != 110 {
		t.Fatalf("VerifyLog = %+v, %v; want 110 records, tlog's root, checkpoint 110", rep, err)
	}

	// A removed segment is named.
	if err := os.Remove(segs[1].Path); err != nil {
		t.Fatal(err)
	}
	_, err = audit.VerifyLog(path, audit.VerifyOptions{})
	if ve, ok := errors.AsType[*audit.VerifyError](err); !ok || ve.Seq != segs[1].First || ve.File != segs[2].Path {
		t.Fatalf("VerifyLog without segment 2 = %v, want the gap at seq %d named", err, segs[1].First)
	}
}

// TestRotationCrash: a crash between the renames of a rotation leaves no active file;
// the log continues after the last segment.
func TestRotationCrash(t *testing.T) {
	t.Parallel()
	path := tempLog(t)
	cfg := audit.Config{Path: path, MaxFileBytes: 2000}
	rotatedLog(t, cfg, 0, 40)
	// Roll the active file into a segment by hand, as the writer had begun to: it starts
	// after the records of the segments.
	if active := readFile(t, path); len(active) > 0 {
		first := 40 - len(lines(active)) + 1
		if err := os.Rename(path, audit.SegmentName(path, uint64(first))); err != nil {
			t.Fatal(err)
		}
	} else if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	rotatedLog(t, cfg, 40, 10)
	if rep, err := audit.VerifyLog(path, audit.VerifyOptions{}); err != nil || rep.Records != 50 {
		t.Fatalf("VerifyLog = %+v, %v; want 50 records", rep, err)
	}
}

func itoa(n uint64) string { return strconv.FormatUint(n, 10) }

// TestScanDuringRotation: a reader scanning while the writer rotates is never handed a
// record under another seq than its own, and VerifyLog of the live log passes.
func TestScanDuringRotation(t *testing.T) {
	t.Parallel()
	path := tempLog(t)
	l := start(t, audit.Config{Path: path, MaxFileBytes: 1500})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 600 {
			if err := l.Append(handshake(i)); err != nil {
				t.Error(err)
				return
			}
			if i%3 == 2 {
				if err := l.Sync(t.Context()); err != nil {
					t.Error(err)
					return
				}
			}
		}
	}()
	scans := 0
	for finished := false; !finished; scans++ {
		select {
		case <-done:
			finished = true
		default:
		}
		err := audit.Scan(path, 1, func(seq uint64, line []byte) error {
			if !bytes.HasPrefix(line, []byte(`{"seq":`+itoa(seq)+`,`)) {
				return fmt.Errorf("seq %d passed with %.20s", seq, line)
			}
			return nil
		})
		if err != nil {
			t.Fatalf("scan %d: %v", scans, err)
		}
		if _, err := audit.VerifyLog(path, audit.VerifyOptions{}); err != nil {
			t.Fatalf("scan %d: VerifyLog: %v", scans, err)
		}
	}
	if n := len(allLines(t, path)); n != 600 {
		t.Fatalf("%d records after the writes, want 600", n)
	}
}
