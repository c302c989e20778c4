package audit

import (
	"bufio"
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/mod/sumdb/tlog"
)

// Config configures a Log. The zero value of every field but Path is usable.
type Config struct {
	// Path is the log file. Required. It is created with mode 0600 if missing; its parent
	// directory must exist. An existing file is appended to, continuing its chain.
	Path string

	// Logger receives the log's own diagnostics (torn tail truncated, write failure). Nil
	// means slog.New(slog.DiscardHandler).
	Logger *slog.Logger

	// Registerer, when set, receives agentmesh_audit_records_total,
	// agentmesh_audit_fsync_seconds and agentmesh_audit_errors_total{op}. Nil means the
	// metrics are kept but not registered.
	Registerer prometheus.Registerer

	// QueueSize is the number of records buffered between Append and the writer before
	// Append blocks; it is also the largest batch committed by one fsync. Zero or negative
	// means 4096.
	QueueSize int

	// Now stamps each record when the writer commits it. Nil means time.Now. Times are
	// written in UTC.
	Now func() time.Time

	// RetryInterval is how long the writer waits, after a write or fsync failure, before it
	// tries again; it doubles up to 1s while the failure lasts, so the log is back within a
	// second of the volume recovering. Zero or negative means 100ms.
	RetryInterval time.Duration

	// MaxFileBytes is the size past which the active file is renamed to a segment
	// (SegmentName) and a new one continues the same tree. Zero or negative means 64 MiB.
	MaxFileBytes int64

	// Origin names the log in its checkpoints (meshapi.AuditOrigin). Required with Signer.
	Origin string
	// Signer is the audit signing key, never the TLS key: an ECDSA P-256 key, in a
	// PKCS#11 token where there is one. With it the log signs a checkpoint of its durable
	// records every CheckpointRecords records or CheckpointInterval, whichever comes
	// first, while it has grown, keeps the latest in Path + ".checkpoint" and sends it to
	// Witness. Nil means no checkpoints.
	Signer crypto.Signer
	// CheckpointRecords and CheckpointInterval: zero or negative means 1000 and 10s.
	CheckpointRecords  int
	CheckpointInterval time.Duration
	// Witness, when set, cosigns each new checkpoint; the latest cosigned one is kept in
	// Path + ".cosigned". Nil: checkpoints are signed but not witnessed.
	Witness Witness
}

// Witness cosigns checkpoints: the CA, through the mesh API, for a proxy's log.
type Witness interface {
	// Witness sends a signed checkpoint with the consistency proof from the size the
	// witness is believed to hold (req.OldSize) and returns the checkpoint cosigned. A
	// witness that holds another size answers a *WitnessConflict, and the log retries
	// once with a proof from that size; one that finds the checkpoint inconsistent
	// answers an error wrapping ErrInconsistent.
	Witness(ctx context.Context, req WitnessRequest) ([]byte, error)
}

// WitnessRequest is a checkpoint for a Witness.
type WitnessRequest struct {
	Checkpoint []byte // signed note
	Key        string // the writer's verifier key (NoteSigner.VerifierKey)
	OldSize    uint64
	Proof      tlog.TreeProof
}

// WitnessConflict is a Witness's answer when it holds a checkpoint of another size than
// WitnessRequest.OldSize: Cosigned is that checkpoint, empty when it holds none.
type WitnessConflict struct {
	Size     uint64
	Cosigned []byte
}

func (e *WitnessConflict) Error() string {
	return fmt.Sprintf("audit: witness holds a checkpoint of size %d", e.Size)
}

func (c Config) withDefaults() Config {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.QueueSize <= 0 {
		c.QueueSize = 4096
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.RetryInterval <= 0 {
		c.RetryInterval = 100 * time.Millisecond
	}
	if c.MaxFileBytes <= 0 {
		c.MaxFileBytes = 64 << 20
	}
	if c.CheckpointRecords <= 0 {
		c.CheckpointRecords = 1000
	}
	if c.CheckpointInterval <= 0 {
		c.CheckpointInterval = 10 * time.Second
	}
	return c
}

// Log is an append-only, hash-chained, group-committed audit log. Create it with Open and
// start its writer with Run. Append, Sync and Err are safe for concurrent use.
type Log struct {
	cfg Config
	m   *metrics
	f   *os.File

	// queue carries records and Sync markers to the writer in Append order. mu orders
	// sending against closing: senders hold the read lock while they check closed and send,
	// Run takes the write lock to set closed and close the channel, so no send can hit a
	// closed channel and no accepted record is left behind.
	mu     sync.RWMutex
	queue  chan item
	closed atomic.Bool

	// failure is nil while the log is healthy. A failure episode ends when a retry
	// succeeds; each episode has its own channel, closed when it starts, to wake Append and
	// Sync calls blocked on a full queue.
	failure atomic.Pointer[failure]
	wake    atomic.Pointer[chan struct{}]
	stopped chan struct{} // closed when Run has committed everything and closed the file
	running atomic.Bool

	// Owned by the writer goroutine. size, seq and prev describe the durable end of the
	// file: what the last successful fsync covered. A failed batch is cut off at size and
	// kept in pending, so the file never holds a half-written record and the chain goes on
	// from the last durable one.
	w       *bufio.Writer
	size    int64
	seq     uint64
	prev    [sha256.Size]byte
	pending []item
	scratch []byte
	// first is the seq of the active file's first record (the next one when it is
	// empty): its segment's name once rotated.
	first uint64

	// tree is the Merkle tree of the durable records; its writes belong to the writer.
	tree *tree
	// cp is nil without Config.Signer. latest and cosigned are the latest signed and
	// cosigned checkpoints.
	cp       *checkpointer
	latest   atomic.Pointer[signedCheckpoint]
	cosigned atomic.Pointer[signedCheckpoint]
}

type failure struct{ err error }

// item is a record to write (fields set) or a Sync marker (ack set).
type item struct {
	kind   string
	fields []byte
	ack    chan error
}

var errClosed = fmt.Errorf("%w: closed", ErrUnavailable)

// retryMax caps the wait between retries after a failure, so the log is back within about a
// second of the volume recovering.
const retryMax = time.Second

// Open opens or creates the log file and reads the end of it to continue the chain from the
// last record. A torn last line (no trailing newline, left by a crash mid-write) is
// truncated away and logged at Warn. Open starts no goroutine; call Run.
func Open(cfg Config) (*Log, error) {
	cfg = cfg.withDefaults()
	if cfg.Path == "" {
		return nil, errors.New("audit: open: Config.Path is empty")
	}
	f, err := os.OpenFile(cfg.Path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: open: %w", err)
	}
	l := &Log{
		cfg:     cfg,
		f:       f,
		queue:   make(chan item, cfg.QueueSize),
		stopped: make(chan struct{}),
		w:       bufio.NewWriterSize(f, 64<<10),
	}
	wake := make(chan struct{})
	l.wake.Store(&wake)
	if err := l.open(); err != nil {
		_ = f.Close() // the open error is the one to report
		return nil, fmt.Errorf("audit: open %s: %w", cfg.Path, err)
	}
	return l, nil
}

// Run is the writer loop. It takes every queued record, writes the batch, fsyncs once per
// batch (group commit) and acknowledges the Sync calls queued with it. When ctx is done it
// stops accepting records, commits everything already accepted, closes the file and returns.
// It returns nil after a clean shutdown and the write, fsync or close failure otherwise.
//
// After a write or fsync failure (a full or failing volume) the log refuses new records
// (Append and Sync return ErrUnavailable) while Run cuts the file back to its last durable
// record and retries the failed batch, every Config.RetryInterval doubling up to a second.
// Once a retry is durable the log accepts records again: no restart is needed, the chain
// goes on without a gap, and no record that a Sync acknowledged is lost. Shutdown waits for
// the final fsync however long the disk takes: cutting it short would lose accepted
// records. Run may be called once.
func (l *Log) Run(ctx context.Context) error {
	if !l.running.CompareAndSwap(false, true) {
		return errors.New("audit: Run called more than once")
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		<-ctx.Done()
		// Waits for in-flight senders, which complete because the writer keeps draining.
		l.mu.Lock()
		l.closed.Store(true)
		close(l.queue)
		l.mu.Unlock()
	})
	if l.cp != nil {
		wg.Go(func() { l.checkpointLoop(ctx) })
	}
	l.writeLoop()
	wg.Wait()
	l.finalCheckpoint()
	if err := l.tree.close(); err != nil {
		l.m.errors.WithLabelValues(opHashes).Inc()
	}
	if err := l.f.Close(); err != nil {
		l.fail(opClose, fmt.Errorf("close %s: %w", l.cfg.Path, err))
	}
	close(l.stopped)
	if f := l.failure.Load(); f != nil {
		return f.err
	}
	return nil
}

// Append queues e to be written. It never drops a record: while the queue is full it blocks
// until the writer catches up. It returns an error wrapping ErrInvalidEvent for an event that
// cannot be recorded, and ErrUnavailable while a write or fsync failure lasts or once Run has
// returned. A nil error means the record is queued, not that it is durable: use Sync for
// that. Append marshals e before returning, so e may be reused afterwards.
func (l *Log) Append(e Event) error {
	kind, fields, err := encodeEvent(e)
	if err != nil {
		l.m.errors.WithLabelValues(opEncode).Inc()
		return fmt.Errorf("audit: append: %w", err)
	}
	l.mu.RLock()
	defer l.mu.RUnlock()
	wake := *l.wake.Load() // before Err: a failure after this closes it
	if err := l.Err(); err != nil {
		return err
	}
	select {
	case l.queue <- item{kind: kind, fields: fields}:
		// A failure between the check above and the send leaves this record to the retry,
		// but the caller must not count on it: say so.
		return l.Err()
	case <-wake:
		return l.Err()
	}
}

// Sync returns once every record whose Append returned before Sync was called is written and
// fsynced, or with the failure that prevented it, or with ctx's error. After a clean
// shutdown it returns nil: Run committed everything it accepted. A nil error is the
// acknowledgement that those records are durable.
func (l *Log) Sync(ctx context.Context) error {
	ack := make(chan error, 1)
	l.mu.RLock()
	if l.closed.Load() {
		l.mu.RUnlock()
		select {
		case <-l.stopped:
		case <-ctx.Done():
			return fmt.Errorf("audit: sync: %w", ctx.Err())
		}
		if f := l.failure.Load(); f != nil {
			return f.err
		}
		return nil
	}
	wake := *l.wake.Load()
	if f := l.failure.Load(); f != nil {
		l.mu.RUnlock()
		return f.err
	}
	select {
	case l.queue <- item{ack: ack}:
	case <-wake:
		l.mu.RUnlock()
		return l.Err()
	case <-ctx.Done():
		l.mu.RUnlock()
		return fmt.Errorf("audit: sync: %w", ctx.Err())
	}
	l.mu.RUnlock()
	select {
	case err := <-ack:
		return err
	case <-ctx.Done():
		return fmt.Errorf("audit: sync: %w", ctx.Err())
	}
}

// Err is nil while the log accepts records. While a write or fsync failure lasts it returns
// an error wrapping ErrUnavailable and the cause; after Run has returned it returns
// ErrUnavailable. The proxy checks it before accepting a handshake, so it refuses traffic
// it could not audit. Cheap: two atomic loads.
func (l *Log) Err() error {
	if f := l.failure.Load(); f != nil {
		return f.err
	}
	if l.closed.Load() {
		return errClosed
	}
	return nil
}

func (l *Log) writeLoop() {
	batch := make([]item, 0, 64)
	for {
		if l.failure.Load() != nil {
			if !l.retry() {
				return
			}
			continue
		}
		it, ok := <-l.queue
		if !ok {
			return
		}
		batch = append(batch[:0], it)
	drain:
		for len(batch) < cap(l.queue) {
			select {
			case it, ok := <-l.queue:
				if !ok {
					break drain // commit what we have; the next receive sees the close
				}
				batch = append(batch, it)
			default:
				break drain
			}
		}
		l.commit(batch)
		clear(batch) // drop references to the encoded events
	}
}

// commit writes the records of batch, fsyncs once and acknowledges its Sync markers: nil
// when the batch is durable, the failure otherwise (the records then wait in pending).
func (l *Log) commit(batch []item) {
	for _, it := range batch {
		if it.ack == nil {
			l.pending = append(l.pending, it)
		}
	}
	err := l.writePending()
	for _, it := range batch {
		if it.ack != nil {
			it.ack <- err
		}
	}
	// Keep one big line from pinning its buffer for the life of the process.
	if cap(l.scratch) > 64<<10 {
		l.scratch = nil
	}
}

// writePending writes and fsyncs the pending records after the durable end of the file.
// On failure it cuts the file back to that end, keeps the records pending and enters (or
// stays in) the failed state; on success it leaves it.
func (l *Log) writePending() error {
	if len(l.pending) == 0 {
		return l.failureErr()
	}
	seq, prev, written := l.seq, l.prev, int64(0)
	op, err := "", error(nil)
	// The tree grows with the records and is cut back with them on failure.
	edge, hashed := l.tree.edge, len(l.tree.buf)
	var now time.Time // of the batch's first record
	for i, it := range l.pending {
		seq++
		t := l.cfg.Now()
		if i == 0 {
			now = t
		}
		var sum [sha256.Size]byte
		l.scratch, sum = appendRecord(l.scratch[:0], seq, t.UTC(), it.kind, &prev, it.fields)
		l.tree.addLine(l.scratch[:len(l.scratch)-1])
		prev = sum
		// bufio only reaches the file when its buffer fills; errors stick and show at Flush.
		_, _ = l.w.Write(l.scratch)
		written += int64(len(l.scratch))
	}
	if err = l.w.Flush(); err != nil {
		op, err = opWrite, fmt.Errorf("write %s: %w", l.cfg.Path, err)
	} else {
		start := time.Now()
		err = l.f.Sync()
		l.m.fsync.Observe(time.Since(start).Seconds())
		if err != nil {
			op, err = opFsync, fmt.Errorf("fsync %s: %w", l.cfg.Path, err)
		}
	}
	if err != nil {
		l.fail(op, err)
		l.rollback()
		l.tree.edge, l.tree.buf = edge, l.tree.buf[:hashed]
		return l.failureErr()
	}
	l.m.records.Add(float64(len(l.pending)))
	first := l.seq + 1
	l.seq, l.prev, l.size = seq, prev, l.size+written
	clear(l.pending)
	l.pending = l.pending[:0]
	l.recover()
	l.committed(first, now)
	return nil
}

// committed follows a durable batch whose first record is first: the tree's hashes, the
// checkpoint's kick, rotation.
func (l *Log) committed(first uint64, now time.Time) {
	if err := l.tree.flush(); err != nil {
		// Derived data: proofs wait for a later batch's write to succeed, and Open
		// rebuilds the file. The records are durable regardless.
		l.m.errors.WithLabelValues(opHashes).Inc()
	}
	if l.cp != nil {
		if l.cfg.Witness != nil {
			l.cp.lag.add(first, now)
		}
		l.kickCheckpoint(l.seq)
	}
	if l.size >= l.cfg.MaxFileBytes {
		l.rotate()
	}
}

func syncDir(dir string) error {
	if runtime.GOOS == "windows" {
		return nil // directories cannot be fsynced there; NTFS journals the entry
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync dir: %w", err)
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("sync dir: %w", err)
	}
	return nil
}
