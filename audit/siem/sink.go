package siem

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/cenkalti/backoff/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/audit"
)

// Defaults of Config.
const (
	DefaultResendWindow = 2 * time.Second
	DefaultMaxBacklog   = 1_000_000
	defaultPoll         = 100 * time.Millisecond
	defaultReconnectMax = 2 * time.Second
	reconnectMin        = 200 * time.Millisecond
	// cursorEvery bounds how often the cursor file is written.
	cursorEvery = time.Second
	// writeTimeout ends a connection whose receiver takes no data for this long.
	writeTimeout = 30 * time.Second
	// batchRecords bounds the records read between two checks of the connection.
	batchRecords = 1024
	// avgRecordBytes estimates the backlog until records have been read to measure.
	avgRecordBytes = 400
)

// Config configures a Sink.
type Config struct {
	// Log is the audit log's path (audit.Config.Path): the spool the Sink reads, across
	// its segments. Required. The cursor is kept in Log + ".siem" (mode 0600).
	Log string
	// Address is the receiver's host:port. Required.
	Address string
	// TLS configures the connection: RootCAs and ServerName to verify the receiver,
	// Certificates when it asks for a client certificate. Required.
	TLS *tls.Config
	// Hostname is the HOSTNAME of every message. Default: os.Hostname.
	Hostname string
	// Origin names the log in the structured data (the checkpoints' origin). Default "-".
	Origin string
	// Filter chooses the records sent. Zero: all of them.
	Filter Filter
	// ResendWindow: after a failed connection, the records written less than this long
	// before the failure was noticed are sent again. Zero or negative means 2s.
	ResendWindow time.Duration
	// MaxBacklog is the number of unsent records past which the Sink raises its alert
	// (metric and one audit record per episode); it goes on and drops nothing. Zero or
	// negative means 1,000,000.
	MaxBacklog int64
	// Poll is how often the end of the log is checked for new records. Zero or negative
	// means 100ms.
	Poll time.Duration
	// ReconnectMax caps the wait between connection attempts, which starts at 200ms and
	// doubles, with jitter. Zero or negative means 2s.
	ReconnectMax time.Duration
	// Audit receives the backlog alert's record (BacklogFull); usually the log itself.
	// Nil: the alert is the metric only.
	Audit interface{ Append(audit.Event) error }
	// Registerer receives the agentmesh_audit_siem_* metrics. Nil: kept, not registered.
	Registerer prometheus.Registerer
	// Logger receives connection failures (Warn) and recoveries (Info). Nil: discarded.
	Logger *slog.Logger
}

func (c Config) withDefaults() Config {
	if c.Hostname == "" {
		c.Hostname, _ = os.Hostname() // "" becomes "-" in the message
	}
	if c.Origin == "" {
		c.Origin = "-"
	}
	if c.ResendWindow <= 0 {
		c.ResendWindow = DefaultResendWindow
	}
	if c.MaxBacklog <= 0 {
		c.MaxBacklog = DefaultMaxBacklog
	}
	if c.Poll <= 0 {
		c.Poll = defaultPoll
	}
	if c.ReconnectMax <= 0 {
		c.ReconnectMax = defaultReconnectMax
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// BacklogFull is the audit record of the backlog alert: more than Max records wait for
// the SIEM. It is written once per episode.
type BacklogFull struct {
	Address string `json:"address"`
	Backlog int64  `json:"backlog"`
	Max     int64  `json:"max"`
	// Next is the seq of the next record to send.
	Next uint64 `json:"next_seq"`
}

// Kind returns "siem_backlog".
func (BacklogFull) Kind() string { return "siem_backlog" }

// Sink delivers a log's records to a syslog receiver. Create it with New, run it with Run.
type Sink struct {
	cfg    Config
	m      *metrics
	cursor string
	// Owned by Run's goroutine.
	savedCursor uint64
	tickAt      time.Time // the last cursor save and backlog check
	alerting    bool
	// consumed is where the follower was in the log's bytes (all files together) at the
	// last check, so the backlog still grows in the metric while no connection is up.
	consumed   int64
	lineBytes  int64 // bytes of the records read, for the backlog estimate
	lines      int64
	frame, msg []byte
}

// New checks cfg and registers the metrics. It starts nothing.
func New(cfg Config) (*Sink, error) {
	cfg = cfg.withDefaults()
	switch {
	case cfg.Log == "":
		return nil, errors.New("siem: Config.Log is empty")
	case cfg.Address == "":
		return nil, errors.New("siem: Config.Address is empty")
	case cfg.TLS == nil:
		return nil, errors.New("siem: Config.TLS is nil")
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, fmt.Errorf("siem: %w", err)
	}
	return &Sink{cfg: cfg, m: m, cursor: cfg.Log + ".siem"}, nil
}

// Run delivers records until ctx is done, then writes the cursor and returns nil. A
// receiver away or a log that cannot be read is retried, counted and logged, never
// returned: the SIEM does not stop the process.
func (s *Sink) Run(ctx context.Context) error {
	next := s.loadCursor()
	s.savedCursor = next
	// Where the cursor is in the log's bytes, for the backlog while no receiver is reached.
	if fl, err := openFollower(s.cfg.Log, next); err == nil {
		s.consumed = logBytes(s.cfg.Log) - fl.unread()
		_ = fl.close() // read only
	}
	for {
		conn, err := s.dial(ctx, next)
		if err != nil {
			return nil //nolint:nilerr // only ctx ends the retries: a shutdown
		}
		next, err = s.deliver(ctx, conn, next)
		s.saveCursor(next)
		if err != nil {
			// The log could not be read (deliver counted it): the process goes on, the
			// sink tries again from where it was after a pause.
			s.cfg.Logger.Warn("siem cannot read the audit log", "path", s.cfg.Log, keyErr, err, keyRetryIn, s.cfg.ReconnectMax)
			select {
			case <-ctx.Done():
			case <-time.After(s.cfg.ReconnectMax):
			}
		}
		if ctx.Err() != nil {
			return nil
		}
	}
}

// dial connects to the receiver, retrying with backoff until it succeeds or ctx is done.
func (s *Sink) dial(ctx context.Context, next uint64) (*tls.Conn, error) {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 15 * time.Second}, Config: s.cfg.TLS}
	attempt := 0
	return backoff.Retry(ctx, func() (*tls.Conn, error) {
		c, err := d.DialContext(ctx, "tcp", s.cfg.Address)
		if err != nil {
			return nil, err
		}
		return c.(*tls.Conn), nil
	}, backoff.WithBackOff(&backoff.ExponentialBackOff{InitialInterval: reconnectMin / 2, RandomizationFactor: 1,
		Multiplier: 2, MaxInterval: s.cfg.ReconnectMax / 2}), backoff.WithMaxElapsedTime(0),
		backoff.WithNotify(func(err error, wait time.Duration) {
			attempt++
			s.m.errors.WithLabelValues(opDial).Inc()
			s.checkBacklog(logBytes(s.cfg.Log), next)
			if attempt == 1 || attempt%10 == 0 {
				s.cfg.Logger.Warn("siem receiver unreachable", keyAddress, s.cfg.Address, keyErr, err, keyRetryIn, wait)
			}
		}))
}

// mark says that the records from seq on, up to the next mark, were written to the
// connection by time t.
type mark struct {
	seq uint64
	t   time.Time
}

// delivery is one connection's state.
type delivery struct {
	conn  *tls.Conn
	w     *bufio.Writer
	fl    *follower
	next  uint64 // the seq after the last record handled (sent or filtered)
	marks []mark
	// dead is closed when the receiver closes the connection or it fails: a syslog
	// receiver never writes, so any end of the read side is the connection's end.
	dead chan struct{}
}

// resendFrom is where delivery goes on after a failure noticed at now: the first record
// written less than the resend window before it, or next when there is none.
func (d *delivery) resendFrom(now time.Time, window time.Duration) uint64 {
	i := 0
	for i < len(d.marks) && !d.marks[i].t.After(now.Add(-window)) {
		i++
	}
	d.marks = d.marks[i:]
	from := d.next
	for _, m := range d.marks {
		from = min(from, m.seq) // not always the first: the follower may have gone back (resync)
	}
	return from
}

// deliver sends records from next on over conn until it fails or ctx is done, and
// returns where to go on from. Its error is an unreadable log.
func (s *Sink) deliver(ctx context.Context, conn *tls.Conn, next uint64) (uint64, error) {
	fl, err := openFollower(s.cfg.Log, next)
	if err != nil {
		_ = conn.Close()
		s.m.errors.WithLabelValues(opRead).Inc()
		return next, err
	}
	d := &delivery{conn: conn, w: bufio.NewWriterSize(conn, 64<<10), fl: fl, next: next, dead: make(chan struct{})}
	go func() {
		_, _ = io.Copy(io.Discard, conn) // the end of the connection is all there is to read
		close(d.dead)
	}()
	defer func() {
		_ = fl.close()
		_ = conn.Close() // wakes the reader
		<-d.dead
		s.m.conn.Set(0)
	}()
	s.m.conn.Set(1)
	s.cfg.Logger.Info("siem connected", keyAddress, s.cfg.Address, keyNext, next)
	poll := time.NewTicker(s.cfg.Poll)
	defer poll.Stop()
	// goOn is always ready: after a full batch the loop only checks ctx and the
	// connection before the next one.
	goOn := make(chan time.Time)
	close(goOn)
	for {
		more, err := s.batch(d)
		if err == nil {
			err = s.flush(d)
		}
		if err != nil {
			var rerr *readError
			if !errors.As(err, &rerr) {
				return s.failed(d, err), nil
			}
			// What the batch wrote before the log failed is sent before the pause.
			if err := s.flush(d); err != nil {
				return s.failed(d, err), rerr.err
			}
			return d.next, rerr.err
		}
		if now := time.Now(); now.Sub(s.tickAt) >= cursorEvery {
			s.tickAt = now
			s.saveCursor(d.resendFrom(now, s.cfg.ResendWindow))
			total := logBytes(s.cfg.Log)
			s.consumed = total - d.fl.unread()
			s.checkBacklog(total, d.next)
		}
		wait := poll.C
		if more {
			wait = goOn
		}
		select {
		case <-ctx.Done():
			// A clean stop: what was flushed is on its way; close_notify ends the stream.
			_ = conn.CloseWrite()
			return d.next, nil
		case <-d.dead:
			return s.failed(d, io.EOF), nil
		case <-wait:
		}
	}
}

// readError tells a failure to read the log, after which the sink pauses, from a
// connection failure, after which it reconnects at once.
type readError struct{ err error }

func (e *readError) Error() string { return e.err.Error() }

// batch reads, filters and writes up to batchRecords records. more reports that it
// stopped at that bound rather than at the end of the log.
func (s *Sink) batch(d *delivery) (more bool, err error) {
	first := true
	// Once a batch: the buffer may flush itself in a Write.
	_ = d.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
	for range batchRecords {
		line, err := d.fl.line()
		if errors.Is(err, io.EOF) {
			d.next = d.fl.next // lower than before when the follower went back (resync)
			return false, nil
		}
		if err != nil {
			s.m.errors.WithLabelValues(opRead).Inc()
			return false, &readError{err}
		}
		if d.fl.broken > 0 {
			s.m.errors.WithLabelValues(opChain).Add(float64(d.fl.broken))
			d.fl.broken = 0
		}
		seq := d.fl.next - 1
		s.lineBytes += int64(len(line)) + 1
		s.lines++
		if !s.pass(line) {
			s.m.filtered.Inc()
			d.next = seq + 1
			continue
		}
		s.frame, s.msg = appendFrame(s.frame[:0], s.msg, seq, line, s.cfg.Hostname, s.cfg.Origin)
		if first {
			d.marks = append(d.marks, mark{seq: seq})
			first = false
		}
		if _, err := d.w.Write(s.frame); err != nil {
			return false, err
		}
		s.m.sent.Inc()
		d.next = seq + 1
	}
	return true, nil
}

// flush writes what batch buffered and stamps the batch's mark with the time.
func (s *Sink) flush(d *delivery) error {
	if d.w.Buffered() > 0 {
		_ = d.conn.SetWriteDeadline(time.Now().Add(writeTimeout))
		if err := d.w.Flush(); err != nil {
			return err
		}
	}
	if n := len(d.marks); n > 0 && d.marks[n-1].t.IsZero() {
		d.marks[n-1].t = time.Now()
	}
	return nil
}

func (s *Sink) pass(line []byte) bool {
	f := s.cfg.Filter
	if f.empty() {
		return true
	}
	result := ""
	if f.needsResult() {
		result = resultOf(line)
	}
	return f.pass(string(parseHeader(line).kind), result)
}

// failed handles a broken connection: it returns the seq to resend from.
func (s *Sink) failed(d *delivery, err error) uint64 {
	now := time.Now()
	if n := len(d.marks); n > 0 && d.marks[n-1].t.IsZero() {
		d.marks[n-1].t = now // a batch that failed before its flush
	}
	from := d.resendFrom(now, s.cfg.ResendWindow)
	s.m.errors.WithLabelValues(opWrite).Inc()
	s.m.resent.Add(float64(d.next - from))
	s.cfg.Logger.Warn("siem connection lost", keyAddress, s.cfg.Address, keyErr, err, keyResend, from, keyNext, d.next)
	return from
}

// checkBacklog updates the backlog gauge from the log's size in bytes, and raises or
// clears the alert.
func (s *Sink) checkBacklog(total int64, next uint64) {
	if s.lines == 0 {
		s.lineBytes, s.lines = sampleLines(s.cfg.Log)
	}
	avg := int64(avgRecordBytes)
	if s.lines > 0 {
		avg = max(s.lineBytes/s.lines, 1)
	}
	n := max(total-s.consumed, 0) / avg
	s.m.backlog.Set(float64(n))
	switch {
	case n > s.cfg.MaxBacklog && !s.alerting:
		s.alerting = true
		s.m.full.Set(1)
		s.cfg.Logger.Error("siem backlog full", keyAddress, s.cfg.Address, keyBacklog, n)
		if s.cfg.Audit != nil {
			if err := s.cfg.Audit.Append(BacklogFull{Address: s.cfg.Address, Backlog: n, Max: s.cfg.MaxBacklog, Next: next}); err != nil {
				s.m.errors.WithLabelValues(opAudit).Inc()
			}
		}
	case n <= s.cfg.MaxBacklog && s.alerting:
		s.alerting = false
		s.m.full.Set(0)
	}
}

// logBytes is the size of all the log's files together; 0 when they cannot be listed.
func logBytes(path string) int64 {
	segs, err := audit.Segments(path)
	if err != nil {
		return 0
	}
	var n int64
	for _, seg := range segs {
		if st, err := os.Stat(seg.Path); err == nil {
			n += st.Size()
		}
	}
	return n
}

// sampleLines measures the records at the start of the active file (up to 64 KiB), for
// the backlog estimate before any record was read: bytes and lines, zero when empty.
func sampleLines(path string) (int64, int64) {
	f, err := os.Open(path)
	if err != nil {
		return 0, 0
	}
	defer func() { _ = f.Close() }() // read only
	buf := make([]byte, 64<<10)
	n, _ := io.ReadFull(f, buf)
	buf = buf[:n]
	lines := int64(bytes.Count(buf, []byte{'\n'}))
	if lines == 0 {
		return 0, 0
	}
	return int64(bytes.LastIndexByte(buf, '\n') + 1), lines
}
