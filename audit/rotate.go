package audit

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
)

// Rotation by size (Config.MaxFileBytes): the active file, once past the limit after a
// durable batch, is renamed to SegmentName(Path, first seq) and a new active file goes on
// with the same seq, chain and tree. A crash between the steps leaves either the full
// active file (rotated again after the next batch) or no active file: Open then creates
// it empty and continues from the last segment.

// rotate moves the full active file to its segment. A failure is counted and logged and
// the writer keeps appending to the active file: the next batch tries again.
func (l *Log) rotate() {
	seg := SegmentName(l.cfg.Path, l.first)
	if err := l.rotateTo(seg); err != nil {
		l.m.errors.WithLabelValues(opRotate).Inc()
		l.cfg.Logger.LogAttrs(context.Background(), slog.LevelWarn, "audit log rotation failed; retrying after the next batch",
			slog.String(keyPath, l.cfg.Path), slog.String(keySegment, seg), slog.Any(keyErr, err))
	}
}

func (l *Log) rotateTo(seg string) error {
	// The new file exists before the old one moves, so a failure to create it costs nothing.
	next := l.cfg.Path + ".next"
	nf, err := os.OpenFile(next, os.O_RDWR|os.O_APPEND|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("create %s: %w", next, err)
	}
	if err := os.Rename(l.cfg.Path, seg); err != nil {
		_ = nf.Close() // unused, emptied again next time
		return fmt.Errorf("rename to %s: %w", seg, err)
	}
	if err := os.Rename(next, l.cfg.Path); err != nil {
		_ = nf.Close()
		if rerr := os.Rename(seg, l.cfg.Path); rerr != nil {
			// No active file: Open would start one after the segment, which is right.
			return fmt.Errorf("rename %s: %w; and back: %w", next, err, rerr)
		}
		return fmt.Errorf("rename %s: %w", next, err)
	}
	if err := syncDir(filepath.Dir(l.cfg.Path)); err != nil {
		// Both names are in place; a crash could undo the renames, which Open handles.
		l.m.errors.WithLabelValues(opRotate).Inc()
	}
	if err := l.f.Close(); err != nil { // fsynced by the batch that filled it
		l.m.errors.WithLabelValues(opClose).Inc()
	}
	l.f, l.size, l.first = nf, 0, l.seq+1
	l.w.Reset(nf)
	return nil
}

// continueFromSegments sets seq, prev and first for an empty active file from the last
// record of the last segment, if any.
func (l *Log) continueFromSegments() error {
	l.first = 1
	segs, err := Segments(l.cfg.Path)
	if err != nil || len(segs) < 2 {
		return err
	}
	last := segs[len(segs)-2]
	f, err := os.Open(last.Path)
	if err != nil {
		return fmt.Errorf("open segment: %w", err)
	}
	defer func() { _ = f.Close() }() // read only
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("open segment: %w", err)
	}
	if st.Size() == 0 {
		return fmt.Errorf("%w: segment %s is empty", ErrCorrupt, last.Path)
	}
	rec, err := lastRecord(f, st.Size())
	if err != nil {
		return fmt.Errorf("segment %s: %w", last.Path, err)
	}
	l.seq, l.prev, l.first = rec.seq, rec.hash, rec.seq+1
	return nil
}

// firstSeq reads the seq of the first record of f.
func firstSeq(f *os.File) (uint64, error) {
	var head [64]byte
	n, err := f.ReadAt(head[:], 0)
	if err != nil && err != io.EOF {
		return 0, fmt.Errorf("read first record: %w", err)
	}
	p := parser{b: head[:n]}
	p.expect(`{"seq":`)
	seq := p.uint()
	if p.err != "" {
		return 0, fmt.Errorf("%w: first record: %s", ErrCorrupt, p.err)
	}
	return seq, nil
}

// finalCheckpoint signs the records committed at shutdown, without waiting for the
// witness: the next run has it cosigned.
func (l *Log) finalCheckpoint() {
	if l.cp == nil {
		return
	}
	ctx := context.Background()
	l.cp.sem <- struct{}{}
	defer func() { <-l.cp.sem }()
	if err := l.checkpointRound(ctx, nil); err != nil {
		l.cfg.Logger.LogAttrs(ctx, slog.LevelWarn, "audit checkpoint at shutdown failed", slog.String(keyPath, l.cfg.Path), slog.Any(keyErr, err))
	}
}
