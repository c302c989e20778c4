package proxy

import (
	"context"
	"errors"
	"net"
	"slices"
	"testing"
	"testing/synctest"
	"time"
)

// flakyListener fails Accept with fails[i] as long as it is true, else hands out
// one end of a pipe; once fails is used up it closes idle and blocks until
// closed. It records when each Accept was called.
type flakyListener struct {
	fails  []bool
	calls  []time.Time
	idle   chan struct{}
	closed chan struct{}
}

func (l *flakyListener) Accept() (net.Conn, error) {
	l.calls = append(l.calls, time.Now())
	if len(l.calls) > len(l.fails) {
		close(l.idle)
		<-l.closed
		return nil, net.ErrClosed
	}
	if l.fails[len(l.calls)-1] {
		return nil, errors.New("accept: too many open files")
	}
	c, _ := net.Pipe()
	return c, nil
}

func (l *flakyListener) Close() error   { close(l.closed); return nil }
func (l *flakyListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1} }

// TestAcceptBackoff: failed Accepts are retried after 5 ms doubling up to 1 s,
// and an accepted connection starts the sequence over.
func TestAcceptBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := timedProxy(t, Config{})
		p.limit = newLimiter(10)
		fails := slices.Repeat([]bool{true}, 10)
		fails = append(fails, false, true, true, false)
		ln := &flakyListener{fails: fails, idle: make(chan struct{}), closed: make(chan struct{})}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error)
		go func() {
			done <- p.acceptLoop(ctx, ln, Outbound, transportNone, func(c net.Conn) { c.Close() })
		}()
		<-ln.idle // the bubble's clock runs while this waits
		cancel()
		if err := ln.Close(); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatalf("acceptLoop = %v after cancel", err)
		}
		p.handlers.Wait()

		ms := time.Millisecond
		want := []time.Duration{5 * ms, 10 * ms, 20 * ms, 40 * ms, 80 * ms, 160 * ms, 320 * ms, 640 * ms, time.Second, time.Second,
			0, 5 * ms, 10 * ms, 0}
		var got []time.Duration
		for i := 1; i < len(ln.calls); i++ {
			got = append(got, ln.calls[i].Sub(ln.calls[i-1]))
		}
		if !slices.Equal(got, want) {
			t.Fatalf("waits between Accepts = %v, want %v", got, want)
		}
	})
}
