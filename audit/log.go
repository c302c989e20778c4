package audit

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
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

	failure  atomic.Pointer[failure]
	failed   chan struct{} // closed on the first write/fsync/close failure
	failOnce sync.Once
	stopped  chan struct{} // closed when Run has committed everything and closed the file
	running  atomic.Bool

	// Owned by the writer goroutine.
	w       *bufio.Writer
	seq     uint64
	prev    [sha256.Size]byte
	scratch []byte
	dirty   bool // written since the last fsync
}

type failure struct{ err error }

// item is a record to write (fields set) or a Sync marker (ack set).
type item struct {
	kind   string
	fields []byte
	ack    chan error
}

var errClosed = fmt.Errorf("%w: closed", ErrUnavailable)

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
		failed:  make(chan struct{}),
		stopped: make(chan struct{}),
		w:       bufio.NewWriterSize(f, 64<<10),
	}
	if err := l.recoverTail(); err != nil {
		_ = f.Close() // the open error is the one to report
		return nil, fmt.Errorf("audit: open %s: %w", cfg.Path, err)
	}
	// The file may have just been created: make its directory entry durable too, or a crash
	// could lose the whole file along with records already reported durable.
	if err := syncDir(filepath.Dir(cfg.Path)); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("audit: open %s: %w", cfg.Path, err)
	}
	if l.m, err = newMetrics(cfg.Registerer); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("audit: open %s: %w", cfg.Path, err)
	}
	return l, nil
}

// Run is the writer loop. It takes every queued record, writes the batch, fsyncs once per
// batch (group commit) and acknowledges the Sync calls queued with it. When ctx is done it
// stops accepting records, commits everything already accepted, closes the file and returns.
// It returns nil after a clean shutdown and the write, fsync or close failure otherwise.
// After a failure it keeps running, refusing records (Append returns ErrUnavailable), until
// ctx is done. Shutdown waits for the final fsync however long the disk takes: cutting it
// short would lose accepted records. Run may be called once.
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
	l.writeLoop()
	wg.Wait()
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
// cannot be recorded, and ErrUnavailable once a write or fsync has failed or Run has
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
	if err := l.Err(); err != nil {
		return err
	}
	select {
	case l.queue <- item{kind: kind, fields: fields}:
		// A failure between the check above and the send may discard this record; say so.
		return l.Err()
	case <-l.failed:
		return l.Err()
	}
}

// Sync returns once every record whose Append returned before Sync was called is written and
// fsynced, or with the failure that prevented it, or with ctx's error. After a clean
// shutdown it returns nil: Run committed everything it accepted.
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
	if f := l.failure.Load(); f != nil {
		l.mu.RUnlock()
		return f.err
	}
	select {
	case l.queue <- item{ack: ack}:
	case <-l.failed:
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

// Err is nil while the log accepts records. Once a write, fsync or close has failed it
// returns an error wrapping ErrUnavailable and the cause; after Run has returned it returns
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

// commit writes the records of batch, fsyncs once and acknowledges its Sync markers.
func (l *Log) commit(batch []item) {
	written := 0
	if l.failure.Load() == nil {
		for _, it := range batch {
			if it.ack != nil {
				continue
			}
			l.seq++
			var sum [sha256.Size]byte
			l.scratch, sum = appendRecord(l.scratch[:0], l.seq, l.cfg.Now().UTC(), it.kind, &l.prev, it.fields)
			l.prev = sum
			l.dirty = true
			// bufio only reaches the file when its buffer fills; errors stick and show at Flush.
			_, _ = l.w.Write(l.scratch)
			written++
		}
		if l.dirty {
			l.flush()
		}
		if l.failure.Load() == nil {
			l.m.records.Add(float64(written))
		}
	}
	var err error
	if f := l.failure.Load(); f != nil {
		err = f.err
	}
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

func (l *Log) flush() {
	if err := l.w.Flush(); err != nil {
		l.fail(opWrite, fmt.Errorf("write %s: %w", l.cfg.Path, err))
		return
	}
	start := time.Now()
	err := l.f.Sync()
	l.m.fsync.Observe(time.Since(start).Seconds())
	if err != nil {
		l.fail(opFsync, fmt.Errorf("fsync %s: %w", l.cfg.Path, err))
		return
	}
	l.dirty = false
}

// fail records the first failure, wakes blocked Append and Sync calls, and logs it once: the
// log is now refusing records, which an operator must hear about when it happens.
func (l *Log) fail(op string, err error) {
	l.m.errors.WithLabelValues(op).Inc()
	l.failOnce.Do(func() {
		l.failure.Store(&failure{err: fmt.Errorf("%w: %w", ErrUnavailable, err)})
		close(l.failed)
		l.cfg.Logger.LogAttrs(context.Background(), slog.LevelError, "audit log failed; refusing new records",
			slog.String(keyPath, l.cfg.Path), slog.String(keyOp, op), slog.Uint64(keySeq, l.seq), slog.Any(keyErr, err))
	})
}

// recoverTail truncates a torn last line and loads seq and prev from the last record.
func (l *Log) recoverTail() error {
	st, err := l.f.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	if size == 0 {
		return nil
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
	}
	if size == 0 {
		return nil
	}
	start, err := lastNewline(l.f, size-1)
	if err != nil {
		return err
	}
	start++
	if size-1-start > maxRecordBytes {
		return fmt.Errorf("%w: last line longer than 1 MiB", ErrCorrupt)
	}
	line := make([]byte, size-1-start)
	if _, err := l.f.ReadAt(line, start); err != nil {
		return fmt.Errorf("read last record: %w", err)
	}
	rec, _, reason := parseRecord(line, nil)
	if reason != "" {
		return fmt.Errorf("%w: last record: %s", ErrCorrupt, reason)
	}
	l.seq, l.prev = rec.seq, rec.hash
	return nil
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
