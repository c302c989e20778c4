package audit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"

	"golang.org/x/mod/sumdb/tlog"
)

// Opening a log: the chain, the tree and the checkpoints continue from what the files
// hold, whatever a crash left in them.

// open continues the chain and the tree from what the files hold.
func (l *Log) open() error {
	if err := l.recoverTail(); err != nil {
		return err
	}
	// The file may have just been created: make its directory entry durable too, or a crash
	// could lose the whole file along with records already reported durable.
	if err := syncDir(filepath.Dir(l.cfg.Path)); err != nil {
		return err
	}
	var err error
	if l.m, err = newMetrics(l.cfg.Registerer); err != nil {
		return err
	}
	if err := l.openCheckpoints(); err != nil {
		return err
	}
	var (
		trusted uint64
		root    tlog.Hash
	)
	if s := l.latest.Load(); s != nil {
		if s.cp.Size > l.seq {
			// Records a checkpoint covered are gone: the next checkpoint will be smaller,
			// and the witness will refuse it.
			l.cfg.Logger.LogAttrs(context.Background(), slog.LevelError, "audit log holds fewer records than its latest checkpoint",
				slog.String(keyPath, l.cfg.Path), slog.Uint64(keySeq, l.seq), slog.Uint64(keySize, s.cp.Size))
			l.latest.Store(nil)
		} else {
			trusted, root = s.cp.Size, s.cp.Hash
		}
	}
	if l.tree, err = openTree(l.cfg.Path, l.seq, trusted, root); err != nil {
		return err
	}
	l.dropForeignCheckpoints()
	return nil
}

// dropForeignCheckpoints forgets a kept checkpoint that the records no longer match (the
// files were replaced or rewritten): the log signs its own anew, and the witness, which
// kept the old one, judges.
func (l *Log) dropForeignCheckpoints() {
	for _, p := range []*atomic.Pointer[signedCheckpoint]{&l.latest, &l.cosigned} {
		s := p.Load()
		if s == nil {
			continue
		}
		if h, err := l.treeHashAt(s.cp.Size); err == nil && h == s.cp.Hash {
			continue
		}
		l.cfg.Logger.LogAttrs(context.Background(), slog.LevelError, "audit log does not match its kept checkpoint; the log was rewritten",
			slog.String(keyPath, l.cfg.Path), slog.Uint64(keySize, s.cp.Size))
		if p == &l.latest {
			p.Store(nil)
		}
	}
}

// recoverTail truncates a torn last line and loads seq and prev from the last record.
func (l *Log) recoverTail() error {
	st, err := l.f.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	l.size = size
	if size == 0 {
		return l.continueFromSegments()
	}
	nl, err := lastNewline(l.f, size)
	if err != nil {
		return err
	}
	if keep := nl + 1; keep != size {
		if err := l.f.Truncate(keep); err != nil {
			return fmt.Errorf("truncate torn tail: %w", err)
		}
		if err := l.f.Sync(); err != nil {
			return fmt.Errorf("truncate torn tail: %w", err)
		}
		l.cfg.Logger.LogAttrs(context.Background(), slog.LevelWarn, "audit log had a torn last line; truncated it",
			slog.String(keyPath, l.cfg.Path), slog.Int64(keyDroppedBytes, size-keep))
		size = keep
		l.size = size
	}
	if size == 0 {
		return l.continueFromSegments()
	}
	rec, err := lastRecord(l.f, size)
	if err != nil {
		return err
	}
	l.seq, l.prev = rec.seq, rec.hash
	l.first, err = firstSeq(l.f)
	return err
}

// lastRecord reads the last record of f, whose size is size and whose last byte is a
// newline.
func lastRecord(f *os.File, size int64) (record, error) {
	start, err := lastNewline(f, size-1)
	if err != nil {
		return record{}, err
	}
	start++
	if size-1-start > maxRecordBytes {
		return record{}, fmt.Errorf("%w: last line longer than 1 MiB", ErrCorrupt)
	}
	line := make([]byte, size-1-start)
	if _, err := f.ReadAt(line, start); err != nil {
		return record{}, fmt.Errorf("read last record: %w", err)
	}
	rec, _, reason := parseRecord(line, nil)
	if reason != "" {
		return record{}, fmt.Errorf("%w: last record: %s", ErrCorrupt, reason)
	}
	return rec, nil
}

// lastNewline returns the offset of the last '\n' before end, or -1, reading backwards in
// chunks so a large file costs only the length of its last line.
func lastNewline(f *os.File, end int64) (int64, error) {
	var buf [32 << 10]byte
	for end > 0 {
		n := min(int64(len(buf)), end)
		chunk := buf[:n]
		if _, err := f.ReadAt(chunk, end-n); err != nil && !errors.Is(err, io.EOF) {
			return 0, fmt.Errorf("read tail: %w", err)
		}
		if i := bytes.LastIndexByte(chunk, '\n'); i >= 0 {
			return end - n + int64(i), nil
		}
		end -= n
	}
	return -1, nil
}
