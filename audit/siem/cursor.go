package siem

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// The cursor file holds one decimal number and a newline: the seq of the first record
// that may not have reached the receiver. It is written atomically (a temporary file
// renamed over it), at most every second.

// loadCursor reads the cursor; a missing or unreadable one starts from the first record,
// which resends rather than loses.
func (s *Sink) loadCursor() uint64 {
	b, err := os.ReadFile(s.cursor)
	if errors.Is(err, os.ErrNotExist) {
		return 1
	}
	if err == nil {
		var n uint64
		if n, err = strconv.ParseUint(string(bytes.TrimSpace(b)), 10, 64); err == nil && n > 0 {
			return n
		}
		err = fmt.Errorf("not a record number: %q", b)
	}
	s.m.errors.WithLabelValues(opCursor).Inc()
	s.cfg.Logger.Warn("siem cursor unreadable: resending from the first record", "path", s.cursor, keyErr, err)
	return 1
}

// saveCursor writes next unless it is already there.
func (s *Sink) saveCursor(next uint64) {
	if next == s.savedCursor {
		return
	}
	if err := writeAtomic(s.cursor, strconv.AppendUint(nil, next, 10)); err != nil {
		s.m.errors.WithLabelValues(opCursor).Inc()
		s.cfg.Logger.Warn("siem cursor not saved", "path", s.cursor, keyErr, err)
		return
	}
	s.savedCursor = next
}

// writeAtomic replaces path with b and a newline. The data is synced before the rename so
// a crash leaves the old cursor or the new one, never an empty file (which would resend
// the whole log); the rename itself is not: losing it only resends a second more.
func writeAtomic(path string, b []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	_, err = tmp.Write(append(b, '\n'))
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		_ = os.Remove(tmp.Name()) // best effort: the error is the write's
	}
	return err
}
