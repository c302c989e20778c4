package audit

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
)

// Verify reads a log from r and checks every record: well-formed header, hash matching the
// content, seq one more than the previous record's (starting at 1), and prev equal to the
// previous record's hash (64 zeros for the first). It returns the number of good records
// before the first bad one. A chain problem is reported as a *VerifyError naming the first
// bad record; an error reading r is returned wrapped, and is not a *VerifyError. An empty
// input is a valid, empty log. Verify streams: memory is bounded by the longest line
// (1 MiB), whatever the size of the log. It never panics, whatever the input.
func Verify(r io.Reader) (int, error) {
	torn := false
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4<<10), maxRecordBytes+1) // grows on demand
	sc.Split(func(data []byte, atEOF bool) (int, []byte, error) {
		// Split on '\n' only: bufio.ScanLines would also drop a '\r', accepting a modified
		// file, and would not tell us that the last line had no newline.
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			return i + 1, data[:i], nil
		}
		if atEOF && len(data) > 0 {
			torn = true
			return len(data), data, nil
		}
		return 0, nil, nil
	})

	var (
		n       int
		prev    [sha256.Size]byte // zero for the first record
		scratch []byte
	)
	bad := func(reason string) (int, error) {
		return n, &VerifyError{Seq: uint64(n) + 1, Line: n + 1, Reason: reason}
	}
	for sc.Scan() {
		if torn {
			return bad("incomplete last line (no trailing newline): torn write or truncation")
		}
		var (
			rec    record
			reason string
		)
		rec, scratch, reason = parseRecord(sc.Bytes(), scratch)
		switch want := uint64(n) + 1; {
		case reason != "":
			return bad(reason)
		case rec.seq != want:
			return bad(fmt.Sprintf("seq is %d, want %d: a record was removed, inserted or reordered", rec.seq, want))
		case rec.prev != prev:
			if n == 0 {
				return bad("prev of the first record is not zero: records before it were removed")
			}
			return bad(fmt.Sprintf("prev does not match the hash of record %d: a record was replaced or edited", n))
		}
		prev = rec.hash
		n++
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return bad("line longer than 1 MiB")
		}
		return n, fmt.Errorf("audit: verify: read: %w", err)
	}
	return n, nil
}
