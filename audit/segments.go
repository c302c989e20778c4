package audit

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// A log is one Merkle tree over its records, kept in one or more files. The active file is
// Config.Path; when it grows past Config.MaxFileBytes it is renamed to a segment,
// Path + "." + the seq of its first record in 20 digits (so the names sort in record
// order), and a new active file goes on with the next seq and the same chain. Segments
// are never written again.

// segmentDigits is the width of a segment's first seq in its name.
const segmentDigits = 20

// SegmentName is the name of the segment of the log at path whose first record is first.
func SegmentName(path string, first uint64) string {
	return fmt.Sprintf("%s.%0*d", path, segmentDigits, first)
}

// Segment is one file of a log.
type Segment struct {
	Path string
	// First is the seq of its first record; 0 for the active file, whose first seq
	// follows from the segments before it.
	First uint64
}

// Segments returns the files of the log at path in record order: its segments, then the
// active file itself (also when it does not exist yet).
func Segments(path string) ([]Segment, error) {
	dir, base := filepath.Dir(path), filepath.Base(path)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("audit: list segments of %s: %w", path, err)
	}
	var segs []Segment
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), base+".")
		if !ok || len(rest) != segmentDigits || !e.Type().IsRegular() {
			continue
		}
		first, err := strconv.ParseUint(rest, 10, 64)
		if err != nil || first == 0 {
			continue
		}
		segs = append(segs, Segment{Path: filepath.Join(dir, e.Name()), First: first})
	}
	slices.SortFunc(segs, func(a, b Segment) int { return int64Cmp(a.First, b.First) })
	return append(segs, Segment{Path: path}), nil
}

func int64Cmp(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	default:
		return 0
	}
}

// ErrStop is what a Scan callback returns to end the scan without error.
var ErrStop = errors.New("audit: stop scan")

// Scan calls fn with every complete record line (without its newline) of the log at path
// whose seq is at least from, in order, across segments, and the seq it has by its
// position (the line itself is not parsed or checked: Verify does that). line is only
// valid during the call. Segments wholly before from are skipped unread. A torn last line
// (no newline yet: a write in progress) is not passed. fn returning ErrStop ends the scan
// with nil; another error ends it with that error.
func Scan(path string, from uint64, fn func(seq uint64, line []byte) error) error {
	// A rotation between listing the segments and opening the active file would number
	// the new active file's records after the old one's: scanFile notices and the scan
	// goes on from where it was with a fresh listing.
	for stuck := 0; ; stuck++ {
		start := from
		err := scanOnce(path, from, func(seq uint64, line []byte) error {
			from = seq + 1
			return fn(seq, line)
		})
		if !errors.Is(err, errRotated) || stuck == maxScanRetries {
			return err
		}
		if from != start {
			stuck = 0
		}
	}
}

// maxScanRetries bounds the fresh listings a scan makes without passing a record.
const maxScanRetries = 100

// errRotated: the active file is not the one the listing of segments was made with.
var errRotated = errors.New("audit: scan: the log rotated during the scan")

func scanOnce(path string, from uint64, fn func(seq uint64, line []byte) error) error {
	segs, err := Segments(path)
	if err != nil {
		return err
	}
	next := uint64(1)
	for i, s := range segs {
		if s.First != 0 {
			next = s.First
		}
		if i+1 < len(segs) && segs[i+1].First != 0 && segs[i+1].First <= from {
			continue // every record of s is before from
		}
		n, err := scanFile(s.Path, next, from, s.First == 0, fn)
		if errors.Is(err, ErrStop) {
			return nil
		}
		if err != nil {
			return err
		}
		next += n
	}
	return nil
}

// scanFile passes the lines of one file, whose first record is first, from seq from on.
// It returns how many complete lines the file holds. For the active file it checks first
// against the seq of its first line, returning errRotated when they differ.
func scanFile(path string, first, from uint64, active bool, fn func(uint64, []byte) error) (uint64, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil // the active file before its first record, or rotated away meanwhile
	}
	if err != nil {
		return 0, fmt.Errorf("audit: scan: %w", err)
	}
	defer func() { _ = f.Close() }() // read only
	r := bufio.NewReaderSize(f, 64<<10)
	var (
		n    uint64
		long []byte
	)
	for {
		chunk, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			if len(long)+len(chunk) > maxRecordBytes+1 {
				return n, fmt.Errorf("audit: scan %s: line %d longer than 1 MiB", path, n+1)
			}
			long = append(long, chunk...)
			continue
		}
		if errors.Is(err, io.EOF) {
			return n, nil // a torn last line, if any, is not a record yet
		}
		if err != nil {
			return n, fmt.Errorf("audit: scan %s: %w", path, err)
		}
		line := chunk
		if long != nil {
			line, long = append(long, chunk...), nil
		}
		seq := first + n
		if active && n == 0 && !bytes.HasPrefix(line, append(strconv.AppendUint([]byte(`{"seq":`), seq, 10), ',')) {
			return 0, errRotated
		}
		n++
		if seq < from {
			continue
		}
		if err := fn(seq, bytes.TrimSuffix(line, []byte{'\n'})); err != nil {
			return n, err
		}
	}
}
