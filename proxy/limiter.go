package proxy

import (
	"context"

	"golang.org/x/sync/semaphore"
)

// limiter caps concurrent connections. The unlimited case is a null object
// so the accept loop has one code path.
type limiter interface {
	// Acquire blocks until a slot is free or ctx is done.
	Acquire(ctx context.Context) error
	Release()
}

func newLimiter(max int) limiter {
	if max <= 0 {
		return unlimited{}
	}
	return weighted{semaphore.NewWeighted(int64(max))}
}

type unlimited struct{}

func (unlimited) Acquire(ctx context.Context) error { return ctx.Err() }
func (unlimited) Release()                          {}

type weighted struct{ s *semaphore.Weighted }

func (w weighted) Acquire(ctx context.Context) error { return w.s.Acquire(ctx, 1) }
func (w weighted) Release()                          { w.s.Release(1) }
