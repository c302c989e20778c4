package siem

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// The follower reads a file another process (goroutine) appends to, and the writer may
// cut its last batch off again after a failed write or fsync and write it anew (audit's
// rollback): records the follower already read, never durable, replaced under the same
// seqs. The records' own chain tells: each line starts with its seq and names the hash
// of the one before, so a line that does not continue the last one read means the file
// changed under the reader, and comparing the lines' hashes with those read finds where.

// chained reports whether line is record seq and follows the record whose hash is prev
// (nil: unknown, not checked; a line without prev is not checked against it either).
func chained(line []byte, seq uint64, prev []byte) bool {
	rest, ok := bytes.CutPrefix(line, []byte(`{"seq":`))
	if !ok {
		return false
	}
	i := bytes.IndexByte(rest, ',')
	if i < 0 {
		return false
	}
	if n, err := strconv.ParseUint(string(rest[:i]), 10, 64); err != nil || n != seq {
		return false
	}
	p := field(line, `"prev":"`)
	return prev == nil || p == nil || bytes.Equal(p, prev)
}

// hashOf is the hash a record line ends with, nil when it has none.
func hashOf(line []byte) []byte {
	const key, hexLen = `,"hash":"`, 64
	n := len(line)
	if n < len(key)+hexLen+2 || !bytes.HasSuffix(line, []byte(`"}`)) ||
		!bytes.Equal(line[n-2-hexLen-len(key):n-2-hexLen], []byte(key)) {
		return nil
	}
	return line[n-2-hexLen : n-2]
}

// accept takes line as record fl.next.
func (fl *follower) accept(line []byte) {
	h := hashOf(line)
	fl.prevHash = append(fl.prevHash[:0], h...)
	if h == nil {
		fl.prevHash = nil
	}
	if fl.active {
		if len(fl.recent) == maxRecent {
			fl.recent = append(fl.recent[:0], fl.recent[maxRecent/2:]...)
		}
		r := recentLine{seq: fl.next}
		copy(r.hash[:], h)
		fl.recent = append(fl.recent, r)
	}
	fl.next++
}

// resync puts the reader of the active file back after the last line that is still
// what it read: a line of the file that recent holds under another hash, or that
// recent does not reach yet, is where reading goes on. Lines older than recent are
// taken as they are: the writer never cuts that far back.
func (fl *follower) resync() error {
	r := bufio.NewReaderSize(io.NewSectionReader(fl.f, 0, 1<<62), 64<<10)
	seq, off := fl.first, int64(0)
	var prev []byte
	oldest := fl.next
	if len(fl.recent) > 0 {
		oldest = fl.recent[0].seq
	}
	for {
		line, err := r.ReadBytes('\n')
		if errors.Is(err, io.EOF) {
			break // the end, or a line being written
		}
		if err != nil {
			return fmt.Errorf("siem: read %s: %w", fl.f.Name(), err)
		}
		h := hashOf(line[:len(line)-1])
		if seq >= oldest {
			i := int(seq - oldest)
			var got [16]byte
			copy(got[:], h)
			if i >= len(fl.recent) || fl.recent[i].hash != got {
				break
			}
		}
		prev = append(prev[:0], h...)
		if h == nil {
			prev = nil
		}
		seq++
		off += int64(len(line))
	}
	if _, err := fl.f.Seek(off, io.SeekStart); err != nil {
		return fmt.Errorf("siem: seek %s: %w", fl.f.Name(), err)
	}
	fl.r.Reset(fl.f)
	if seq >= oldest {
		fl.recent = fl.recent[:seq-oldest]
	}
	fl.next, fl.offset, fl.partial, fl.prevHash, fl.resyncedAt = seq, off, fl.partial[:0], prev, off
	return nil
}
