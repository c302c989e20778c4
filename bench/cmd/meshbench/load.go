package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"time"
)

// payload is the size of a request and of its echo.
const payload = 64

// opTimeout bounds one request, so a stuck connection costs an error, not the run.
const opTimeout = 10 * time.Second

// errPause follows a failed request: a worker spinning on errors would steal the CPU
// that the others are measured with.
const errPause = 10 * time.Millisecond

var errCorrupt = errors.New("echo differs from request")

// phase is one fixed-length measurement: requests started during the warm-up are done
// but not measured, so caches, pools and tickets are in their steady state.
type phase struct {
	warmup, measure time.Duration
}

// stats summarises one phase, or the same phase over several rounds.
type stats struct {
	lat      []time.Duration // latency of each request started in a measured window
	total    int             // requests done, warm-ups included
	errs     int             // failed requests, warm-ups included
	firstErr error           // the first failure, for the report
	window   time.Duration   // the measured windows
	p50, p99 time.Duration   // set by finish
}

// add merges o, a later round of the same phase, into s.
func (s *stats) add(o stats) {
	s.lat = append(s.lat, o.lat...)
	s.total += o.total
	s.errs += o.errs
	s.window += o.window
	if s.firstErr == nil {
		s.firstErr = o.firstErr
	}
}

// finish computes the percentiles.
func (s *stats) finish() {
	if len(s.lat) == 0 {
		return
	}
	slices.Sort(s.lat)
	s.p50 = s.lat[len(s.lat)*50/100]
	s.p99 = s.lat[min(len(s.lat)-1, len(s.lat)*99/100)]
}

func (s *stats) ops() int { return len(s.lat) }

func (s *stats) rate() float64 {
	if s.window <= 0 {
		return 0
	}
	return float64(s.ops()) / s.window.Seconds()
}

func (s *stats) String() string {
	str := fmt.Sprintf("%.0f/s p50 %s p99 %s", s.rate(), fmtDur(s.p50), fmtDur(s.p99))
	if s.errs > 0 {
		str += fmt.Sprintf(" errors %d (first: %v)", s.errs, s.firstErr)
	}
	return str
}

// worker is one of the c concurrent clients. Its buffers live as long as it does, so a
// request allocates nothing of the load generator's own.
type worker struct {
	req  []byte // the mode byte, then the payload whose first 8 bytes are a sequence number
	resp []byte
	seq  uint64
	conn net.Conn // the persistent connection, when there is one
	lat  []time.Duration
	done int
	errs int
	err  error
}

func (w *worker) fail(err error) {
	w.errs++
	if w.err == nil {
		w.err = err
	}
}

// next numbers the next request, so a misdelivered echo is detected.
func (w *worker) next() {
	w.seq++
	binary.BigEndian.PutUint64(w.req[1:], w.seq)
}

// drive runs op in c workers for the phase and measures each call. prepare, if not nil,
// runs for each worker before the clock starts.
func drive(c int, ph phase, prepare, op func(*worker) error) stats {
	ws := make([]*worker, c)
	for i := range ws {
		w := &worker{req: make([]byte, 1+payload), resp: make([]byte, payload),
			lat: make([]time.Duration, 0, 1<<14)}
		w.req[0] = modeEcho
		for j := 9; j < len(w.req); j++ {
			w.req[j] = byte(i + j)
		}
		if prepare != nil {
			if err := prepare(w); err != nil {
				w.fail(err)
			}
		}
		ws[i] = w
	}
	from := time.Now().Add(ph.warmup)
	until := from.Add(ph.measure)
	var wg sync.WaitGroup
	for _, w := range ws {
		wg.Go(func() {
			for {
				t0 := time.Now()
				if !t0.Before(until) {
					return
				}
				if err := op(w); err != nil {
					w.fail(err)
					time.Sleep(errPause)
					continue
				}
				w.done++
				if !t0.Before(from) {
					w.lat = append(w.lat, time.Since(t0))
				}
			}
		})
	}
	wg.Wait()
	s := stats{window: ph.measure}
	for _, w := range ws {
		if w.conn != nil {
			w.conn.Close()
		}
		s.lat = append(s.lat, w.lat...)
		s.total += w.done
		s.errs += w.errs
		if s.firstErr == nil {
			s.firstErr = w.err
		}
	}
	s.finish()
	return s
}

// newConnections measures one new connection per request: connect, send 64 bytes, read
// their echo, close.
func newConnections(addr string, c int, ph phase) stats {
	var d net.Dialer
	return drive(c, ph, nil, func(w *worker) error {
		conn, err := d.Dial("tcp", addr)
		if err != nil {
			return err
		}
		defer conn.Close()
		if err := conn.SetDeadline(time.Now().Add(opTimeout)); err != nil {
			return err
		}
		w.next()
		if _, err := conn.Write(w.req); err != nil {
			return err
		}
		if _, err := io.ReadFull(conn, w.resp); err != nil {
			return err
		}
		if !bytes.Equal(w.resp, w.req[1:]) {
			return errCorrupt
		}
		return nil
	})
}

// pingPong measures 64-byte request/echo round trips on c persistent connections,
// opened before the clock starts.
func pingPong(addr string, c int, ph phase) stats {
	deadline := time.Now().Add(ph.warmup + ph.measure + time.Minute)
	connect := func(w *worker) error {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			return err
		}
		if err := conn.SetDeadline(deadline); err != nil {
			conn.Close()
			return err
		}
		if _, err := conn.Write(w.req[:1]); err != nil {
			conn.Close()
			return err
		}
		w.conn = conn
		return nil
	}
	return drive(c, ph, connect, func(w *worker) error {
		if w.conn == nil {
			if err := connect(w); err != nil {
				return err
			}
		}
		w.next()
		err := func() error {
			if _, err := w.conn.Write(w.req[1:]); err != nil {
				return err
			}
			if _, err := io.ReadFull(w.conn, w.resp); err != nil {
				return err
			}
			if !bytes.Equal(w.resp, w.req[1:]) {
				return errCorrupt
			}
			return nil
		}()
		if err != nil {
			w.conn.Close()
			w.conn = nil
		}
		return err
	})
}

// upload sends size bytes on one connection and returns MB/s (10⁶ bytes), counted from
// the first byte sent to the server's acknowledgement that it has read them all.
func upload(ctx context.Context, addr string, size int64) (float64, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	if err := conn.SetDeadline(time.Now().Add(10 * time.Minute)); err != nil {
		return 0, err
	}
	// Incompressible and the same every run.
	buf := make([]byte, 256<<10)
	rng := rand.NewChaCha8([32]byte{'m', 'e', 's', 'h'})
	_, _ = rng.Read(buf)

	var hdr [9]byte
	hdr[0] = modeSink
	binary.BigEndian.PutUint64(hdr[1:], uint64(size))
	t0 := time.Now()
	if _, err := conn.Write(hdr[:]); err != nil {
		return 0, err
	}
	for sent := int64(0); sent < size; {
		n, err := conn.Write(buf[:min(int64(len(buf)), size-sent)])
		sent += int64(n)
		if err != nil {
			return 0, err
		}
	}
	if _, err := io.ReadFull(conn, hdr[:8]); err != nil {
		return 0, fmt.Errorf("upload acknowledgement: %w", err)
	}
	el := time.Since(t0)
	if got := binary.BigEndian.Uint64(hdr[:8]); got != uint64(size) {
		return 0, fmt.Errorf("server read %d of %d bytes", got, size)
	}
	return float64(size) / el.Seconds() / 1e6, nil
}

// rotationResult is a new-connection phase during which the client's proxy rotates.
type rotationResult struct {
	stats
	rotations int
	failed    int   // rotate commands that failed
	rotErr    error // the first of them
}

// underRotation measures new connections at concurrency c while rotate runs at once and
// then every second (a rotation that takes longer delays the next one).
func underRotation(ctx context.Context, addr string, c int, d time.Duration, rotate func(context.Context) error) rotationResult {
	ctx, cancel := context.WithCancel(ctx)
	var r rotationResult
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			err := rotate(ctx)
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				r.failed++
				if r.rotErr == nil {
					r.rotErr = err
				}
			} else {
				r.rotations++
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	})
	r.stats = newConnections(addr, c, phase{measure: d})
	cancel()
	wg.Wait()
	return r
}

func fmtDur(d time.Duration) string {
	switch {
	case d == 0:
		return "-"
	case d < time.Millisecond:
		return fmt.Sprintf("%d µs", d.Microseconds())
	default:
		return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
	}
}
