package proxy

import (
	"golang.org/x/sync/semaphore"
)

// limiter caps a number of concurrent things: connections (Config.MaxConnections) or
// handshakes (Config.MaxHandshakes). Over the cap the caller refuses at once instead of
// queueing: a queue would make a legitimate peer wait behind a flood, and a refused attempt
// costs the proxy nothing but a close.
type limiter struct{ s *semaphore.Weighted }

func newLimiter(slots int) limiter { return limiter{semaphore.NewWeighted(int64(slots))} }

// TryAcquire takes a slot if one is free.
func (l limiter) TryAcquire() bool { return l.s.TryAcquire(1) }

// Release returns a slot taken by TryAcquire.
func (l limiter) Release() { l.s.Release(1) }
