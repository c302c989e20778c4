package siem

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/agentmesh/agentmesh/audit"
)

// maxLine bounds one record line, as the writer does (audit refuses larger events).
const maxLine = 1 << 20

// follower reads the record lines of a log in order, across its segments, and goes on
// reading the active file as it grows and after it is rotated. It is used by one
// goroutine.
type follower struct {
	path string
	f    *os.File
	r    *bufio.Reader
	// active: f is (or was, before a rotation) the file at path rather than a segment.
	active bool
	// files are the segments still to read after f, in order; empty once f is active.
	files []audit.Segment
	// next is the seq of the next complete line to read; partial holds the bytes of a line
	// whose newline is not written yet.
	next    uint64
	partial []byte
	// first is the seq of f's first line; offset is how far into f the reader has
	// consumed.
	first  uint64
	offset int64
	// prevHash is the hash of the line read last (nil when unknown), recent the lines
	// read from the active file, oldest first: what tells that the file changed under
	// the reader and where it did (resync). resyncedAt is where the last resync left
	// the reader, so a line that does not chain there is passed on, not resynced again.
	prevHash   []byte
	recent     []recentLine
	resyncedAt int64
	// inChain: the last line read followed the one before it. Only then does a line
	// that does not send the reader back (resync).
	inChain bool
	// broken counts the places where the lines stopped following each other (a
	// changed file), not yet passed on to the metric.
	broken int
}

// recentLine is a line read from the active file: its seq and the start of its hash.
type recentLine struct {
	seq  uint64
	hash [16]byte
}

// maxRecent bounds recent; it is more than a batch of the writer (audit.Config.QueueSize,
// 4096 by default), the most it cuts off at once.
const maxRecent = 16384

// openFollower positions a follower so that its first line is the record with seq from
// (or the first one after, when the log starts later).
func openFollower(path string, from uint64) (*follower, error) {
	segs, err := audit.Segments(path)
	if err != nil {
		return nil, err
	}
	// Start at the last segment whose first record is at or before from: the ones before
	// it hold nothing to send.
	start := 0
	for i, s := range segs {
		if s.First != 0 && s.First <= from {
			start = i
		}
	}
	fl := &follower{path: path, files: segs[start:], next: 1, resyncedAt: -1, inChain: true}
	if err := fl.advance(); err != nil {
		return nil, err
	}
	for fl.next < from {
		_, err := fl.line()
		if errors.Is(err, io.EOF) {
			break // the log ends before from: the records from there on are sent as they come
		}
		if err != nil {
			_ = fl.close()
			return nil, err
		}
	}
	return fl, nil
}

// advance opens the next file to read. It leaves f nil when that is the active file and it
// does not exist yet.
func (fl *follower) advance() error {
	if len(fl.files) == 1 {
		// About to follow the active file: segments made since the listing (a rotation
		// while the ones before were read) come first.
		segs, err := audit.Segments(fl.path)
		if err != nil {
			return err
		}
		fl.files = fl.files[:0]
		for _, s := range segs {
			if s.First == 0 || s.First >= fl.next {
				fl.files = append(fl.files, s)
			}
		}
	}
	s := fl.files[0]
	fl.files = fl.files[1:]
	if s.First != 0 {
		fl.next = s.First
	}
	fl.active = len(fl.files) == 0
	f, err := os.Open(s.Path)
	if errors.Is(err, os.ErrNotExist) && fl.active {
		return nil
	}
	if err != nil {
		return fmt.Errorf("siem: open %s: %w", s.Path, err)
	}
	if fl.f != nil {
		_ = fl.f.Close() // read only
	}
	fl.f, fl.first, fl.offset, fl.partial, fl.recent = f, fl.next, 0, fl.partial[:0], fl.recent[:0]
	if fl.r == nil {
		fl.r = bufio.NewReaderSize(f, 64<<10)
	} else {
		fl.r.Reset(f)
	}
	return nil
}

// line returns the next complete record line (without its newline) and its seq, or
// io.EOF when there is none yet. The line is valid until the next call.
func (fl *follower) line() ([]byte, error) {
	for {
		if fl.f == nil {
			if err := fl.reopenActive(); err != nil {
				return nil, err
			}
			if fl.f == nil {
				return nil, io.EOF
			}
		}
		chunk, err := fl.r.ReadSlice('\n')
		fl.offset += int64(len(chunk))
		switch {
		case err == nil:
			line := chunk
			if len(fl.partial) > 0 {
				fl.partial = append(fl.partial, chunk...)
				line = fl.partial
				fl.partial = fl.partial[:0]
			}
			line = line[:len(line)-1]
			start := fl.offset - int64(len(line)) - 1
			switch {
			case chained(line, fl.next, fl.prevHash):
				fl.inChain = true
			case fl.inChain && fl.active && start != fl.resyncedAt:
				if err := fl.resync(); err != nil {
					return nil, err
				}
				continue
			case fl.inChain:
				// Not the writer's rollback (resync found nothing to go back to) but a
				// changed file: counted once, then the lines go out as they are until
				// one chains again, without a resync each.
				fl.inChain = false
				fl.broken++
			default: // still out of the chain: counted when it broke
			}
			fl.accept(line)
			return line, nil
		case errors.Is(err, bufio.ErrBufferFull) || errors.Is(err, io.EOF):
			if len(fl.partial)+len(chunk) > maxLine+1 {
				return nil, fmt.Errorf("siem: %s: record %d longer than 1 MiB", fl.f.Name(), fl.next)
			}
			fl.partial = append(fl.partial, chunk...)
			if errors.Is(err, bufio.ErrBufferFull) {
				continue
			}
			moved, err := fl.atEnd()
			if err != nil {
				return nil, err
			}
			if !moved {
				return nil, io.EOF
			}
		default:
			return nil, fmt.Errorf("siem: read %s: %w", fl.f.Name(), err)
		}
	}
}

// atEnd is called at the end of f: it moves on to the next file when f is a segment, or
// when f was the active file and has been rotated away (renamed to a segment, a new
// active file in its place). It reports whether it moved.
func (fl *follower) atEnd() (bool, error) {
	if !fl.active {
		return true, fl.advance()
	}
	old, err := fl.f.Stat()
	if err != nil {
		return false, fmt.Errorf("siem: stat %s: %w", fl.f.Name(), err)
	}
	if old.Size() < fl.offset {
		return true, fl.resync() // cut: see resync
	}
	cur, err := os.Stat(fl.path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil // renamed, its successor not created yet
	}
	if err != nil {
		return false, fmt.Errorf("siem: stat %s: %w", fl.path, err)
	}
	if os.SameFile(cur, old) {
		return false, nil
	}
	// Rotated. The writer wrote its last line to the old file before renaming it, so what
	// was read is all of it; a torn tail there would be a bug of the writer, not a record.
	if len(fl.partial) > 0 {
		return false, fmt.Errorf("siem: %s ends with an incomplete record %d", fl.f.Name(), fl.next)
	}
	fl.files = []audit.Segment{{Path: fl.path}}
	return true, fl.advance()
}

// reopenActive opens the active file once it exists.
func (fl *follower) reopenActive() error {
	fl.files = []audit.Segment{{Path: fl.path}}
	return fl.advance()
}

// unread estimates the bytes of the log not read yet: the rest of f and, if f is a
// segment, the files after it.
func (fl *follower) unread() int64 {
	var n int64
	if fl.f != nil {
		if st, err := fl.f.Stat(); err == nil {
			n += st.Size() - fl.offset
		}
	}
	for _, s := range fl.files {
		if st, err := os.Stat(s.Path); err == nil {
			n += st.Size()
		}
	}
	return max(n, 0)
}

func (fl *follower) close() error {
	if fl.f == nil {
		return nil
	}
	return fl.f.Close()
}
