package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/cenkalti/backoff/v5"
)

// Accept backoff after a failed Accept (EMFILE, ENFILE, ENOBUFS, ...): retrying
// at once would spin; waiting too long would leave the port deaf.
const (
	acceptBackoffMin = 5 * time.Millisecond
	acceptBackoffMax = time.Second
)

// acceptLoop accepts until ctx is done or ln is closed and hands every
// connection to handle in its own goroutine, tracked by p.handlers.
//
// Every connection takes one of the MaxConnections slots, shared by all
// listeners and the quic transport, until handle returns. Over the limit a
// connection is closed at once, counted and aggregated with the other
// refusals of its source (dir and transport say which listener it reached):
// waiting for a slot would make a legitimate peer queue behind a flood.
func (p *Proxy) acceptLoop(ctx context.Context, ln net.Listener, dir Direction, transport string, handle func(net.Conn)) error {
	// No randomisation: one listener's retries need no spreading.
	wait := backoff.ExponentialBackOff{InitialInterval: acceptBackoffMin, Multiplier: 2, MaxInterval: acceptBackoffMax}
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("proxy: accept %s: %w", ln.Addr(), err)
			}
			delay := wait.NextBackOff()
			p.cfg.Logger.LogAttrs(ctx, slog.LevelWarn, "accept failed, backing off",
				slog.String(keyListen, ln.Addr().String()),
				slog.Duration(keyBackoff, delay),
				slog.Any(keyErr, err))
			t := time.NewTimer(delay)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
			continue
		}
		wait.Reset()
		if !p.limit.TryAcquire() {
			p.refuseEarly(dir, conn.RemoteAddr().String(), transport, ReasonMaxConnections)
			_ = conn.Close()
			continue
		}
		// WaitGroup.Go reserves the slot before the goroutine exists, so
		// Run's Wait cannot miss it.
		p.handlers.Go(func() {
			defer p.limit.Release()
			handle(conn)
		})
	}
}
