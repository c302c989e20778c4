package rotator

import (
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Triggers recorded with each rotation.
const (
	TriggerEnroll  = "enroll"  // no SVID yet
	TriggerTime    = "time"    // the renewal time of the current SVID came
	TriggerExpired = "expired" // the current SVID expired before a renewal succeeded
	TriggerReject  = "reject"  // the CA refused renewal for good; enrol again
)

// Run obtains an SVID, then renews it on schedule until ctx is done. Failures are
// retried with capped exponential backoff and full jitter, never sleeping past the
// current SVID's expiry; once it has expired (renewal is then impossible) or the CA
// refuses renewal for good, Run enrols again. Run returns nil when ctx is done.
func (r *Rotator) Run(ctx context.Context) error {
	next := time.Now()
	reenroll := false
	for {
		wake := r.wakeAt(next)
		if !sleepUntil(ctx, wake) {
			return nil
		}
		now := time.Now()
		r.endOverlaps(now)
		if now.Before(next) {
			continue
		}
		trigger := r.trigger(now, reenroll)
		err := r.rotate(ctx, trigger)
		if ctx.Err() != nil {
			return nil
		}
		s := r.state.Load()
		if err == nil {
			reenroll = false
			next = s.renewAt
			continue
		}
		reenroll = trigger != TriggerTime || permanent(err)
		wait := Backoff(s.attempts, r.cfg.Policy, r.cfg.Rand.Float64())
		if s.current != nil && !expired(s.current.notAfter(), now) {
			// Short-lived SVIDs leave little time: wait at most a quarter of what
			// remains (but not less than RetryMin), so several attempts fit before
			// expiry, and wake at expiry at the latest: from then on the identity is
			// not ready and only enrolment helps.
			left := s.current.notAfter().Sub(now)
			wait = min(wait, max(left/4, r.cfg.Policy.RetryMin))
			next = minTime(now.Add(wait), s.current.notAfter().Add(time.Nanosecond))
		} else {
			next = now.Add(wait)
		}
		r.cfg.Logger.LogAttrs(ctx, slog.LevelWarn, "rotation failed, will retry",
			slog.String(keySPIFFEID, r.cfg.ID.String()), slog.String(keyTrigger, trigger),
			slog.Int(keyAttempt, s.attempts), slog.Duration(keyRetryIn, time.Until(next)),
			slog.Any(keyErr, err))
	}
}

func (r *Rotator) trigger(now time.Time, reenroll bool) string {
	c := r.state.Load().current
	switch {
	case c == nil:
		return TriggerEnroll
	case expired(c.notAfter(), now):
		return TriggerExpired
	case reenroll:
		return TriggerReject
	}
	return TriggerTime
}

// wakeAt is the earliest of the next rotation and the end of any overlap.
func (r *Rotator) wakeAt(next time.Time) time.Time {
	for _, c := range r.state.Load().overlap {
		next = minTime(next, c.overlapUntil)
	}
	return next
}

// rotate makes one attempt: a new key, a certificate for it, validation, publication.
func (r *Rotator) rotate(ctx context.Context, trigger string) error {
	started := time.Now()
	old := r.state.Load().current
	svid, err := r.obtain(ctx, trigger, old)
	finished := time.Now()

	rec := &audit.Rotation{
		SPIFFEID:  r.cfg.ID.String(),
		Trigger:   trigger,
		Initiator: "rotator",
		Result:    "ok",
		Started:   started,
		Finished:  finished,
	}
	if old != nil {
		rec.OldSerial = old.serial
	}
	if err != nil {
		rec.Result, rec.Reason = "error", err.Error()
		r.publishFailure(err)
	} else {
		c := newCredential(svid)
		rec.NewSerial, rec.NotAfter = c.serial, c.notAfter()
		r.publish(c, finished)
	}
	r.metrics.rotated(trigger, rec.Result)
	if r.cfg.Audit != nil {
		if aerr := r.cfg.Audit.Append(rec); aerr != nil {
			r.cfg.Logger.LogAttrs(ctx, slog.LevelError, "audit rotation", slog.Any(keyErr, aerr))
		}
	}
	if err == nil {
		s := r.state.Load()
		r.cfg.Logger.LogAttrs(ctx, slog.LevelInfo, "rotated",
			slog.String(keySPIFFEID, r.cfg.ID.String()), slog.String(keyTrigger, trigger),
			slog.String(keyOldSerial, rec.OldSerial), slog.String(keySerial, rec.NewSerial),
			slog.Time(keyNotAfter, rec.NotAfter), slog.Time(keyRenewAt, s.renewAt))
	}
	return err
}

func (r *Rotator) obtain(ctx context.Context, trigger string, old *credential) (*x509svid.SVID, error) {
	key, err := r.cfg.NewKey()
	if err != nil {
		return nil, fmt.Errorf("rotator: new key: %w", err)
	}
	var certs []*x509.Certificate
	if trigger == TriggerTime {
		certs, err = r.cfg.Issuer.Renew(ctx, old.svid, key)
	} else {
		certs, err = r.cfg.Issuer.Enroll(ctx, r.cfg.ID, key)
	}
	if err != nil {
		return nil, fmt.Errorf("rotator: %s %s: %w", trigger, r.cfg.ID, err)
	}
	return checkAnswer(r.cfg.ID, key, certs, r.state.Load().bundle, time.Now())
}

// publish makes c the current credential and moves the previous one into overlap.
func (r *Rotator) publish(c *credential, now time.Time) {
	s := r.state.Load()
	next := &snapshot{current: c, bundle: s.bundle}
	if prev := s.current; prev != nil && !expired(prev.notAfter(), now) {
		end := prev.notAfter()
		if ov := r.cfg.Policy.Overlap; ov > 0 {
			end = minTime(end, now.Add(ov))
		}
		moved := *prev
		moved.overlapUntil = end
		next.overlap = append(next.overlap, &moved)
	}
	for _, o := range s.overlap {
		if now.Before(o.overlapUntil) {
			next.overlap = append(next.overlap, o)
		}
	}
	leaf := c.svid.Certificates[0]
	next.renewAt = RenewAt(leaf.NotBefore, leaf.NotAfter, r.cfg.Policy, r.cfg.Rand.Float64())
	r.state.Store(next)
	r.metrics.published(next)
}

func (r *Rotator) publishFailure(err error) {
	s := *r.state.Load()
	s.lastErr, s.attempts = err, s.attempts+1
	r.state.Store(&s)
}

// endOverlaps drops superseded SVIDs whose overlap has ended.
func (r *Rotator) endOverlaps(now time.Time) {
	s := r.state.Load()
	kept := s.overlap[:0:0]
	for _, o := range s.overlap {
		if now.Before(o.overlapUntil) {
			kept = append(kept, o)
		}
	}
	if len(kept) == len(s.overlap) {
		return
	}
	next := *s
	next.overlap = kept
	r.state.Store(&next)
	r.metrics.published(&next)
}

// sleepUntil waits until t or ctx is done, reporting whether t came.
func sleepUntil(ctx context.Context, t time.Time) bool {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err() == nil
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-timer.C:
		return true
	}
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}
