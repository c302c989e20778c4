package audit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"golang.org/x/mod/sumdb/tlog"
)

// Checkpoints (Config.Signer): a goroutine of Run signs the durable tree every
// CheckpointRecords records or CheckpointInterval, writes it to Path + ".checkpoint" and
// has the Witness cosign it. It never holds up the writer: it reads the published tree
// state and the hash file, and the writer only kicks it.

// signedCheckpoint is a checkpoint and its signed note, immutable once published.
type signedCheckpoint struct {
	note []byte
	cp   Checkpoint
}

// checkpointer is the checkpoint state of a Log with a Signer.
type checkpointer struct {
	signer   *NoteSigner
	verifier *NoteVerifier
	// sem serialises checkpoint rounds (the loop, Checkpoint and the last one at
	// shutdown): a witness exchange depends on what the previous one left.
	sem  chan struct{}
	kick chan struct{}
	lag  lagMarks
}

// openCheckpoints loads the latest checkpoint and cosigned checkpoint written by an
// earlier run. Either file missing, unreadable or not signed by this log's key counts as
// none: they are the writer's own state, and the witness holds the truth.
func (l *Log) openCheckpoints() error {
	if l.cfg.Signer == nil {
		return nil
	}
	s, err := NewNoteSigner(l.cfg.Origin, l.cfg.Signer)
	if err != nil {
		return fmt.Errorf("checkpoint signer: %w", err)
	}
	v, _ := NewNoteVerifier(l.cfg.Origin, l.cfg.Signer.Public()) // checked by NewNoteSigner
	l.cp = &checkpointer{signer: s, verifier: v, sem: make(chan struct{}, 1), kick: make(chan struct{}, 1)}
	if sc := l.loadCheckpoint(checkpointSuffix); sc != nil {
		l.latest.Store(sc)
		l.m.checkpointSize.Set(float64(sc.cp.Size))
	}
	if sc := l.loadCheckpoint(cosignedSuffix); sc != nil {
		l.cosigned.Store(sc)
		l.m.witnessedSize.Set(float64(sc.cp.Size))
	}
	return nil
}

// loadCheckpoint reads Path + suffix; nil when missing or not valid (logged).
func (l *Log) loadCheckpoint(suffix string) *signedCheckpoint {
	sc, err := l.readCheckpoint(l.cfg.Path + suffix)
	if err != nil {
		l.cfg.Logger.LogAttrs(context.Background(), slog.LevelWarn, "audit checkpoint file ignored",
			slog.String(keyPath, l.cfg.Path+suffix), slog.Any(keyErr, err))
	}
	return sc
}

// readCheckpoint reads a checkpoint of this log signed by its key: nil when the file does
// not exist.
func (l *Log) readCheckpoint(path string) (*signedCheckpoint, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	_, c, err := OpenCheckpoint(b, l.cp.verifier)
	if err != nil {
		return nil, err
	}
	if c.Origin != l.cfg.Origin {
		return nil, fmt.Errorf("%w: origin %q, want %q", ErrCheckpoint, c.Origin, l.cfg.Origin)
	}
	return &signedCheckpoint{note: b, cp: c}, nil
}

// Latest returns the latest signed checkpoint of the log's durable records, as a signed
// note and parsed; a nil note when none was signed yet (no Signer, or an empty log). Safe
// for concurrent use.
func (l *Log) Latest() ([]byte, Checkpoint) {
	if s := l.latest.Load(); s != nil {
		return s.note, s.cp
	}
	return nil, Checkpoint{}
}

// Checkpoint signs a checkpoint of the durable records now, if the log grew since the
// latest one, and has the Witness cosign it if it is not cosigned yet. It returns an
// error wrapping ErrInconsistent when the witness refuses the log as rewritten; other
// errors are those of signing, writing or the witness. Run signs checkpoints by itself:
// this is for tests and for callers that need a checkpoint at a given moment. Safe for
// concurrent use; it returns nil at once without a Signer.
func (l *Log) Checkpoint(ctx context.Context) error {
	if l.cp == nil {
		return nil
	}
	return l.round(ctx, l.cfg.Witness)
}

// checkpointLoop runs checkpoint rounds when kicked by the writer, at every interval, and
// once at start (the latest checkpoint may not be witnessed yet). A failed round is
// logged and counted; the next one retries. After a failed witness exchange, kicks only
// sign until the next interval: a witness that is down or refuses the log hears from it
// once per interval, not once per CheckpointRecords records.
func (l *Log) checkpointLoop(ctx context.Context) {
	t := time.NewTicker(l.cfg.CheckpointInterval)
	defer t.Stop()
	witnessFailed, tick := false, true
	for {
		w := l.cfg.Witness
		if witnessFailed && !tick {
			w = nil
		}
		err := l.round(ctx, w)
		if w != nil {
			witnessFailed = err != nil
		}
		if err != nil && ctx.Err() == nil {
			level := slog.LevelWarn
			if errors.Is(err, ErrInconsistent) {
				level = slog.LevelError
			}
			l.cfg.Logger.LogAttrs(ctx, level, "audit checkpoint failed", slog.String(keyPath, l.cfg.Path), slog.Any(keyErr, err))
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			tick = true
		case <-l.cp.kick:
			tick = false
		}
	}
}

// round is one checkpoint round with w, under sem.
func (l *Log) round(ctx context.Context, w Witness) error {
	select {
	case l.cp.sem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("audit: checkpoint: %w", ctx.Err())
	}
	defer func() { <-l.cp.sem }()
	return l.checkpointRound(ctx, w)
}

// kickCheckpoint tells the loop, without waiting, that CheckpointRecords records were
// committed since the latest checkpoint.
func (l *Log) kickCheckpoint(size uint64) {
	if l.cp == nil {
		return
	}
	var last uint64
	if s := l.latest.Load(); s != nil {
		last = s.cp.Size
	}
	if size-last < uint64(l.cfg.CheckpointRecords) {
		return
	}
	select {
	case l.cp.kick <- struct{}{}:
	default:
	}
}

// checkpointRound signs the durable tree if it grew, then has w cosign the latest
// checkpoint if it is not yet (w nil: sign only). Called holding sem.
func (l *Log) checkpointRound(ctx context.Context, w Witness) error {
	defer l.updateLag()
	cur := l.tree.current()
	latest := l.latest.Load()
	if cur.size > 0 && (latest == nil || cur.size > latest.cp.Size) {
		s, err := l.sign(cur)
		if err != nil {
			l.m.checkpoints.WithLabelValues(resultError).Inc()
			return fmt.Errorf("audit: checkpoint: %w", err)
		}
		l.m.checkpoints.WithLabelValues(resultSigned).Inc()
		l.m.checkpointSize.Set(float64(s.cp.Size))
		latest = s
	}
	if w == nil || latest == nil {
		return nil
	}
	// Anything but the cosigned checkpoint itself goes to the witness, a smaller one
	// too: that the log lost records is the witness's to hear and refuse.
	if c := l.cosigned.Load(); c != nil && c.cp == latest.cp {
		return nil
	}
	return l.witness(ctx, w, latest)
}

// sign signs the checkpoint of the tree state cur and writes it to Path + ".checkpoint".
func (l *Log) sign(cur treeState) (*signedCheckpoint, error) {
	// The hashes the checkpoint covers must be durable before it: Open trusts the hash
	// file up to the checkpoint's size.
	if err := l.tree.f.Sync(); err != nil {
		return nil, fmt.Errorf("fsync %s: %w", l.tree.path, err)
	}
	c := Checkpoint{Origin: l.cfg.Origin, Size: cur.size, Hash: cur.root}
	b, err := SignCheckpoint(c, l.cp.signer)
	if err != nil {
		return nil, err
	}
	if err := writeFileAtomic(l.cfg.Path+checkpointSuffix, b); err != nil {
		return nil, err
	}
	s := &signedCheckpoint{note: b, cp: c}
	l.latest.Store(s)
	return s, nil
}

// witness has w cosign s, sending the consistency proof from the last cosigned size, or,
// when the witness holds another size, from that size. When what the witness holds is not
// a prefix of this log, the log was rewritten or cut: the checkpoint is still sent, so
// the witness refuses it and alerts, and the round fails as refused whatever it answers.
func (l *Log) witness(ctx context.Context, w Witness, s *signedCheckpoint) error {
	var old uint64
	if c := l.cosigned.Load(); c != nil {
		old = c.cp.Size
	}
	out, err := l.sendWitness(ctx, w, s, old)
	if conflict, ok := errors.AsType[*WitnessConflict](err); ok {
		l.m.checkpoints.WithLabelValues(resultConflict).Inc()
		perr := l.checkPrefix(conflict, s.cp.Size)
		out, err = l.sendWitness(ctx, w, s, conflict.Size)
		if perr != nil {
			l.m.checkpoints.WithLabelValues(resultRefused).Inc()
			return fmt.Errorf("audit: witness: %w", perr)
		}
	}
	switch {
	case errors.Is(err, ErrInconsistent):
		l.m.checkpoints.WithLabelValues(resultRefused).Inc()
		return fmt.Errorf("audit: witness refused checkpoint %d: %w", s.cp.Size, err)
	case err != nil:
		l.m.checkpoints.WithLabelValues(resultError).Inc()
		return fmt.Errorf("audit: witness checkpoint %d: %w", s.cp.Size, err)
	}
	if err := l.keepCosigned(out, s); err != nil {
		l.m.checkpoints.WithLabelValues(resultError).Inc()
		return fmt.Errorf("audit: witness checkpoint %d: %w", s.cp.Size, err)
	}
	l.m.checkpoints.WithLabelValues(resultWitnessed).Inc()
	return nil
}

func (l *Log) sendWitness(ctx context.Context, w Witness, s *signedCheckpoint, old uint64) ([]byte, error) {
	var proof tlog.TreeProof
	if old <= s.cp.Size { // else there is no proof: the witness refuses the cut log
		var err error
		if proof, err = l.ProveConsistency(old, s.cp.Size); err != nil {
			return nil, err
		}
	}
	return w.Witness(ctx, WitnessRequest{Checkpoint: s.note, Key: l.cp.verifier.Key(), OldSize: old, Proof: proof})
}

// checkPrefix checks that the checkpoint a witness holds (conflict) is one this log signed
// of a prefix of its tree of size size. If not, the witness saw another log under this
// origin: this one was rewritten or cut.
func (l *Log) checkPrefix(conflict *WitnessConflict, size uint64) error {
	if conflict.Size == 0 {
		return nil
	}
	if conflict.Size > size {
		return fmt.Errorf("%w: the witness holds size %d, the log has %d records: records were removed", ErrInconsistent, conflict.Size, size)
	}
	_, c, err := OpenCheckpoint(conflict.Cosigned, l.cp.verifier)
	if err != nil || c.Size != conflict.Size || c.Origin != l.cfg.Origin {
		return fmt.Errorf("%w: the witness holds a checkpoint of size %d this log did not sign", ErrInconsistent, conflict.Size)
	}
	h, err := l.treeHashAt(c.Size)
	if err != nil {
		return err
	}
	if h != c.Hash {
		return fmt.Errorf("%w: the witness's checkpoint of size %d does not match the log: it was rewritten", ErrInconsistent, c.Size)
	}
	return nil
}

// keepCosigned checks that out is s with more signatures and keeps it as the latest
// cosigned checkpoint.
func (l *Log) keepCosigned(out []byte, s *signedCheckpoint) error {
	_, c, err := OpenCheckpoint(out, l.cp.verifier)
	if err != nil {
		return fmt.Errorf("cosigned checkpoint: %w", err)
	}
	if c != s.cp || !bytes.HasPrefix(out, []byte(s.cp.Text())) {
		return fmt.Errorf("%w: the witness returned another checkpoint", ErrCheckpoint)
	}
	if err := writeFileAtomic(l.cfg.Path+cosignedSuffix, out); err != nil {
		return err
	}
	l.cosigned.Store(&signedCheckpoint{note: out, cp: c})
	l.m.witnessedSize.Set(float64(c.Size))
	return nil
}

// updateLag sets checkpoint_lag_seconds: the age of the oldest record not in a cosigned
// checkpoint. Without a Witness it stays 0: nothing is expected to cosign.
func (l *Log) updateLag() {
	if l.cfg.Witness == nil {
		return
	}
	var w uint64
	if c := l.cosigned.Load(); c != nil {
		w = c.cp.Size
	}
	l.m.checkpointLag.Set(l.cp.lag.age(w, l.tree.current().size, l.cfg.Now()).Seconds())
}

// lagMarks remembers when records were committed, coarsely: a mark is the first seq of a
// batch and its commit time, at most one per markEvery and maxMarks in all (the oldest is
// kept, so the lag of a witness that stays away is measured exactly).
type lagMarks struct {
	mu    sync.Mutex
	marks []lagMark
}

type lagMark struct {
	seq uint64
	t   time.Time
}

const (
	markEvery = 100 * time.Millisecond
	maxMarks  = 4096
)

// add notes that record seq was committed at t.
func (g *lagMarks) add(seq uint64, t time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if n := len(g.marks); n > 0 && t.Sub(g.marks[n-1].t) < markEvery {
		return
	}
	if len(g.marks) == maxMarks {
		g.marks = append(g.marks[:1], g.marks[2:]...)
	}
	g.marks = append(g.marks, lagMark{seq: seq, t: t})
}

// age is how long ago the oldest record after witnessed (of size records) was committed, at
// most one markEvery too much; 0 when all are witnessed. Marks of witnessed records go.
func (g *lagMarks) age(witnessed, size uint64, now time.Time) time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	i := 0
	for i+1 < len(g.marks) && g.marks[i+1].seq <= witnessed+1 {
		i++
	}
	g.marks = g.marks[i:]
	if witnessed >= size || len(g.marks) == 0 {
		return 0
	}
	return max(0, now.Sub(g.marks[0].t))
}

// writeFileAtomic replaces path with data: a temporary file, fsynced, renamed over it, so
// a crash leaves the old or the new content. The directory is not fsynced: losing the
// rename in a crash leaves the previous checkpoint, which the log and the witness handle
// (the witness holds the truth), and it saves a journal commit per checkpoint.
func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
