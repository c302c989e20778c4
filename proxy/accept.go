package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"
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
// The connection limit is taken after Accept: with one limiter shared by
// several listeners, taking it before would let an idle listener sit on a
// slot while a busy one starves. At the limit each listener holds at most one
// accepted connection waiting for a slot and stops accepting; the rest wait
// in the kernel backlog.
func (p *Proxy) acceptLoop(ctx context.Context, ln net.Listener, handle func(net.Conn)) error {
	var backoff time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("proxy: accept %s: %w", ln.Addr(), err)
			}
			backoff = min(max(2*backoff, acceptBackoffMin), acceptBackoffMax)
			p.cfg.Logger.LogAttrs(ctx, slog.LevelWarn, "accept failed, backing off",
				slog.String(keyListen, ln.Addr().String()),
				slog.Duration(keyBackoff, backoff),
				slog.Any(keyErr, err))
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
			continue
		}
		backoff = 0
		if err := p.limit.Acquire(ctx); err != nil {
			_ = conn.Close() // shutting down
			return nil
		}
		// WaitGroup.Go reserves the slot before the goroutine exists, so
		// Run's Wait cannot miss it.
		p.handlers.Go(func() {
			defer p.limit.Release()
			handle(conn)
		})
	}
}
