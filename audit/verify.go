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
	var c chain
	torn, err := c.read(r, nil)
	if err == nil && torn {
		err = c.bad("incomplete last line (no trailing newline): torn write or truncation")
	}
	return int(c.n), err
}

// chain checks records one line at a time, carrying seq and prev across files.
type chain struct {
	n       uint64            // good records so far
	prev    [sha256.Size]byte // zero before the first record
	line    int               // lines read from the current file
	file    string            // for errors; "" for a stream
	scratch []byte
}

func (c *chain) bad(reason string) error {
	return &VerifyError{File: c.file, Seq: c.n + 1, Line: c.line + 1, Reason: reason}
}

// read checks every complete line of r as the next records, calling fn (if not nil) with
// each good one. It stops at the first bad record (a *VerifyError) and reports whether r
// ended with an incomplete line, which it does not check.
func (c *chain) read(r io.Reader, fn func(line []byte)) (torn bool, err error) {
	c.line = 0
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
			return len(data), nil, nil
		}
		return 0, nil, nil
	})
	for sc.Scan() {
		if torn {
			break
		}
		if reason := c.next(sc.Bytes()); reason != "" {
			return false, c.bad(reason)
		}
		if fn != nil {
			fn(sc.Bytes())
		}
		c.line++
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return false, c.bad("line longer than 1 MiB")
		}
		return false, fmt.Errorf("audit: verify: read: %w", err)
	}
	return torn, nil
}

// next checks line as the record after the good ones and returns why it is bad, or "".
func (c *chain) next(line []byte) string {
	var (
		rec    record
		reason string
	)
	rec, c.scratch, reason = parseRecord(line, c.scratch)
	switch want := c.n + 1; {
	case reason != "":
		return reason
	case rec.seq != want:
		return fmt.Sprintf("seq is %d, want %d: a record was removed, inserted or reordered", rec.seq, want)
	case rec.prev != c.prev:
		if c.n == 0 {
			return "prev of the first record is not zero: records before it were removed"
		}
		return fmt.Sprintf("prev does not match the hash of record %d: a record was replaced or edited", c.n)
	}
	c.prev = rec.hash
	c.n++
	return ""
}
