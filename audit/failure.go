package audit

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/cenkalti/backoff/v5"
)

// A failing volume (Run's doc comment): the writer enters the failed state on a write or
// fsync failure, cuts the file back to its durable end and retries the kept batch until a
// retry is durable.

// rollback cuts off whatever part of a failed batch reached the file and resets the buffer,
// whose error is sticky. If the cut fails too, the next retry tries it again before writing.
func (l *Log) rollback() {
	l.w.Reset(l.f)
	if err := l.f.Truncate(l.size); err != nil {
		l.m.errors.WithLabelValues(opTruncate).Inc()
	}
}

// retry waits for the next attempt, answering Sync markers with the failure and keeping
// records that were queued before the failure, then rewrites the pending records. It
// returns false once the queue is closed and a last attempt has been made.
func (l *Log) retry() bool {
	wait := backoff.ExponentialBackOff{InitialInterval: l.cfg.RetryInterval, Multiplier: 2, MaxInterval: retryMax}
	for l.failure.Load() != nil {
		t := time.NewTimer(wait.NextBackOff())
	wait:
		for {
			select {
			case it, ok := <-l.queue:
				if !ok {
					t.Stop()
					l.attempt()
					return false
				}
				if it.ack != nil {
					it.ack <- l.failureErr()
					continue
				}
				l.pending = append(l.pending, it)
			case <-t.C:
				break wait
			}
		}
		l.attempt()
	}
	return true
}

// attempt tries to cut the file back to its durable end and write the pending records.
func (l *Log) attempt() {
	if err := l.f.Truncate(l.size); err != nil {
		l.m.errors.WithLabelValues(opTruncate).Inc()
		return
	}
	l.w.Reset(l.f)
	if len(l.pending) == 0 {
		// Nothing to prove the volume writable with: an fsync of the unchanged file.
		if err := l.f.Sync(); err != nil {
			l.m.errors.WithLabelValues(opFsync).Inc()
			return
		}
		l.recover()
		return
	}
	_ = l.writePending()
}

func (l *Log) failureErr() error {
	if f := l.failure.Load(); f != nil {
		return f.err
	}
	return nil
}

// fail enters the failed state, or counts another failure in it. Entering wakes blocked
// Append and Sync calls and logs at Error, once per episode: the log is now refusing
// records, and an operator must hear about it when it happens.
func (l *Log) fail(op string, err error) {
	l.m.errors.WithLabelValues(op).Inc()
	if l.failure.Load() != nil {
		return
	}
	l.failure.Store(&failure{err: fmt.Errorf("%w: %w", ErrUnavailable, err)})
	l.m.unavailable.Set(1)
	close(*l.wake.Load())
	l.cfg.Logger.LogAttrs(context.Background(), slog.LevelError, "audit log failed; refusing new records until a write succeeds",
		slog.String(keyPath, l.cfg.Path), slog.String(keyOp, op), slog.Uint64(keySeq, l.seq), slog.Any(keyErr, err))
}

// recover leaves the failed state, if in it.
func (l *Log) recover() {
	if l.failure.Load() == nil {
		return
	}
	wake := make(chan struct{})
	l.wake.Store(&wake)
	l.failure.Store(nil)
	l.m.unavailable.Set(0)
	l.cfg.Logger.LogAttrs(context.Background(), slog.LevelInfo, "audit log writable again; accepting records",
		slog.String(keyPath, l.cfg.Path), slog.Uint64(keySeq, l.seq))
}
