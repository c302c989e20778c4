package meshclient

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/cenkalti/backoff/v5"
)

const (
	defaultHeartbeat = 10 * time.Second
	// longPollWait is the wait the client asks the CA for; under the CA's 60s cap and
	// under common idle timeouts of load balancers in between.
	longPollWait = 25 * time.Second
	// maxRetryBase is the first retry delay (before jitter) after a failure; the
	// backoff doubles from there up to the heartbeat interval.
	maxRetryBase = 500 * time.Millisecond
)

// newBackOff is the retry schedule of the registration and the watch: exponential
// from base, doubling, capped at maxDelay, with full jitter (each wait uniform in
// [0, that delay]). backoff's randomisation spreads a wait over [0, 2×interval] with a
// factor of 1, hence the halved intervals.
func newBackOff(base, maxDelay time.Duration) *backoff.ExponentialBackOff {
	return &backoff.ExponentialBackOff{
		InitialInterval:     base / 2,
		RandomizationFactor: 1,
		Multiplier:          2,
		MaxInterval:         maxDelay / 2,
	}
}

// retry runs op until it succeeds or ctx is done, logging each failure at Warn with
// the attempt number and the wait before the next one (never longer than maxDelay).
func retry[T any](ctx context.Context, log *slog.Logger, msg string, base, maxDelay time.Duration, op func() (T, error)) (T, error) {
	attempt := 0
	return backoff.Retry(ctx, op,
		backoff.WithBackOff(newBackOff(min(base, maxDelay), maxDelay)),
		backoff.WithMaxElapsedTime(0),
		backoff.WithNotify(func(err error, wait time.Duration) {
			attempt++
			log.Warn(msg, keyErr, err, keyAttempt, attempt, keyRetryIn, wait)
		}))
}

// jittered is the wait before the next heartbeat or poll: the interval minus up to a
// tenth of it (r uniform in [0, 1)), never more than the interval, so that proxies
// started together spread out and the TTL margin is kept.
func jittered(interval time.Duration, r float64) time.Duration {
	return interval - time.Duration(r*float64(interval)/10)
}

// pause waits for d (minus up to a tenth of jitter when jitter is set) or until ctx
// is done; it reports whether the wait ended by itself.
func pause(ctx context.Context, d time.Duration, jitter bool) bool {
	if jitter {
		d = jittered(d, rand.Float64()) //nolint:gosec // G404: jitter spreads polls out; nothing secret
	}
	return pauseUntil(ctx, d, nil)
}

// pauseUntil waits for d, or for a receive on wake (nil: never), or until ctx is done;
// it reports whether the wait ended otherwise than by ctx.
func pauseUntil(ctx context.Context, d time.Duration, wake <-chan struct{}) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	case <-wake:
		return true
	}
}
