package rotator

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Trigger is why a rotation happened (audit.Rotation.Trigger, the trigger label of
// agentmesh_rotator_rotations_total). A key made, certified or superseded by a rotation
// carries it as its Cause.
type Trigger string

// Triggers recorded with each rotation.
const (
	TriggerEnroll     Trigger = "enroll"     // no SVID yet
	TriggerTime       Trigger = "time"       // the renewal time of the current SVID came
	TriggerExpired    Trigger = "expired"    // the current SVID expired before a renewal succeeded
	TriggerReject     Trigger = "reject"     // the CA refused renewal for good; enrol again
	TriggerRevoked    Trigger = "revoked"    // Revoke dropped the current SVID; enrol again
	TriggerUsage      Trigger = "usage"      // Policy.MaxHandshakes handshakes were signed with the current key
	TriggerOperator   Trigger = "operator"   // Rotate: an operator asked
	TriggerCompromise Trigger = "compromise" // Rotate: the current key is compromised
	TriggerConfig     Trigger = "config"     // Rotate: the configuration changed
	TriggerFleet      Trigger = "fleet"      // Rotate: a fleet command from the CA
	TriggerAnchor     Trigger = "anchor"     // Rotate: a rotation of the CA's anchors asks for a new issuer
	// TriggerRestart: Run started from a valid SVID that Config.StateFile kept; it is
	// renewed at once, authenticated by itself, instead of enrolling again.
	TriggerRestart Trigger = "restart"
)

// initiatorRotator is the initiator of the rotations the loop decides by itself.
const initiatorRotator = "rotator"

// Run obtains an SVID, then renews it on schedule, on the usage trigger and on Rotate
// requests until ctx is done. Failures are retried with capped exponential backoff and
// full jitter, never sleeping past the current SVID's expiry; once it has expired
// (renewal is then impossible), the CA refuses renewal for good, or Revoke or a
// compromise dropped it, Run enrols again. Superseded credentials are drained and
// their keys destroyed on goroutines Run owns, so a drain's grace never delays a
// rotation. Run returns nil when ctx is done, once those goroutines have finished:
// keys already retired are still destroyed then (drains not yet started are skipped),
// while the current key and those still in overlap are left as they are, since
// handshakes may use them until the process exits.
func (r *Rotator) Run(ctx context.Context) error {
	loopDone := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() { r.runRetirer(ctx, loopDone) })
	defer func() {
		close(loopDone)
		wg.Wait()
		close(r.stopped)
	}()
	r.loop(ctx)
	return nil
}

// loopState is what Run's loop carries from one iteration to the next.
type loopState struct {
	next     time.Time // when the next scheduled attempt is due
	reenroll bool      // the last renewal was refused for good: enrol instead
	handled  uint64    // version of the dropped SVID whose immediate re-enrolment was made
	usage    uint64    // version of the key whose usage rotation was started
	restored bool      // the current SVID was restored at start and not renewed yet
}

func (r *Rotator) loop(ctx context.Context) {
	l := loopState{next: time.Now()}
	l.restored = r.restore(ctx) == RestoreValid
	for {
		call, ok := r.sleepUntil(ctx, r.wakeAt(l.next))
		if !ok {
			return
		}
		now := time.Now()
		if r.policyChanged.Swap(false) {
			r.reschedule(now, &l)
		}
		r.endOverlaps(now)
		r.syncStore(ctx) // a Revoke may have dropped the stored SVID
		if call != nil {
			r.serve(ctx, call, &l)
			r.syncStore(ctx)
			continue
		}
		s := r.state.Load()
		if d := s.dropped; d != nil && s.current == nil && d.version != l.handled {
			// Revoke dropped the current SVID: re-enrol at once, once per revocation;
			// further attempts wait for the backoff like any other failure.
			l.handled, l.next = d.version, now
		}
		if c := s.current; c != nil && c.version != l.usage && !expired(c.notAfter(), now) &&
			usageDue(c.handshakes.Load(), r.policy.Load().MaxHandshakes) {
			// Once per key: if the rotation fails, retries follow the backoff.
			l.usage, l.next = c.version, now
		}
		if now.Before(l.next) {
			continue
		}
		trigger := triggerFor(s, now, l.reenroll, r.policy.Load().MaxHandshakes)
		if trigger == TriggerTime && l.restored {
			trigger = TriggerRestart
		}
		a := attempt{trigger: trigger, actor: audit.Actor{Initiator: initiatorRotator}, old: s.current}
		if a.old == nil {
			a.old = s.dropped
		}
		if trigger == TriggerTime || trigger == TriggerUsage || trigger == TriggerRestart {
			a.auth = s.current
		}
		_, err := r.rotate(ctx, a)
		if ctx.Err() != nil {
			return
		}
		r.syncStore(ctx)
		if err == nil {
			l.reenroll, l.restored, l.next = false, false, r.state.Load().renewAt
			continue
		}
		l.reenroll = a.auth == nil || permanent(err)
		s = r.state.Load()
		l.next = r.retryAt(s, time.Now())
		level := slog.LevelWarn
		if s.needsToken {
			// Retrying cannot help until an operator writes a new token.
			level = slog.LevelError
		}
		r.cfg.Logger.LogAttrs(ctx, level, "rotation failed, will retry",
			slog.String(keySPIFFEID, r.cfg.ID.String()), slog.String(keyTrigger, string(trigger)),
			slog.Int(keyAttempt, s.attempts), slog.Duration(keyRetryIn, time.Until(l.next)),
			slog.Any(keyErr, err))
	}
}

// triggerFor names the rotation due in s at now. maxHandshakes is the usage threshold.
func triggerFor(s *snapshot, now time.Time, reenroll bool, maxHandshakes uint64) Trigger {
	c := s.current
	switch {
	case c == nil && s.dropped != nil && s.dropCause == CauseRevoked:
		return TriggerRevoked
	case c == nil && s.dropped != nil:
		return TriggerCompromise
	case c == nil:
		return TriggerEnroll
	case expired(c.notAfter(), now):
		return TriggerExpired
	case reenroll:
		return TriggerReject
	case usageDue(c.handshakes.Load(), maxHandshakes):
		return TriggerUsage
	}
	return TriggerTime
}

// retryAt is when to retry after a failed attempt at now.
func (r *Rotator) retryAt(s *snapshot, now time.Time) time.Time {
	p := r.policy.Load()
	wait := Backoff(s.attempts, *p, r.cfg.Rand.Float64())
	c := s.current
	if c == nil || expired(c.notAfter(), now) {
		return now.Add(wait)
	}
	// Short-lived SVIDs leave little time: wait at most a quarter of what remains (but
	// not less than RetryMin), so several attempts fit before expiry, and wake at
	// expiry at the latest: from then on the identity is not ready and only enrolment
	// helps.
	left := c.notAfter().Sub(now)
	wait = min(wait, max(left/4, p.RetryMin))
	return minTime(now.Add(wait), c.notAfter().Add(time.Nanosecond))
}

// wakeAt is the earliest of the next rotation, the end of any overlap and the expiry
// of the current SVID (whose connections are then drained).
func (r *Rotator) wakeAt(next time.Time) time.Time {
	s := r.state.Load()
	for _, c := range s.overlap {
		next = minTime(next, c.overlapUntil)
	}
	if c := s.current; c != nil && !c.retiring {
		next = minTime(next, c.notAfter().Add(time.Nanosecond))
	}
	return next
}

// attempt is one rotation to make.
type attempt struct {
	trigger Trigger
	actor   audit.Actor
	reason  string
	auth    *credential // the SVID that authenticates a renewal; nil: enrol
	old     *credential // the credential replaced, for the records
}

// rotate makes one attempt: a new key (pre-activation), a certificate for it,
// validation, publication (active; the previous one to overlap). A failed attempt's key
// is destroyed at once. auth and old come from the snapshot the attempt was decided
// on, so a concurrent Revoke cannot leave a renewal without the SVID it authenticates
// with.
func (r *Rotator) rotate(ctx context.Context, a attempt) (RotateResult, error) {
	started := time.Now()
	var res RotateResult
	if a.old != nil {
		res.OldSerial, res.OldVersion = a.old.serial, a.old.version
	}
	var c *credential
	key, version, err := r.newKey(ctx, a.trigger)
	if err == nil {
		var svid *x509svid.SVID
		if svid, err = r.obtain(ctx, a, key); err == nil {
			c = newCredential(svid, version, r.signedWith)
			err = r.publish(ctx, c, a, time.Now())
		}
		if err != nil {
			r.discard(ctx, version, key, c)
		}
	}
	finished := time.Now()

	rec := &audit.Rotation{
		SPIFFEID:  r.cfg.ID.String(),
		Trigger:   string(a.trigger),
		Actor:     a.actor,
		OldSerial: res.OldSerial,
		Result:    audit.ResultOK,
		Reason:    a.reason,
		Started:   started,
		Finished:  finished,
	}
	if err != nil {
		rec.Result, rec.Reason = audit.ResultError, err.Error()
		if a.reason != "" {
			rec.Reason = a.reason + ": " + err.Error()
		}
		r.publishFailure(err)
	} else {
		rec.NewSerial, rec.NotAfter = c.serial, c.notAfter()
		res.NewSerial, res.NewVersion = c.serial, c.version
	}
	r.metrics.rotated(string(a.trigger), string(rec.Result))
	if r.cfg.Audit != nil {
		if aerr := r.cfg.Audit.Append(rec); aerr != nil {
			r.cfg.Logger.LogAttrs(ctx, slog.LevelError, "audit rotation", slog.Any(keyErr, aerr))
		}
	}
	if err == nil && r.cfg.OnRotate != nil {
		r.cfg.OnRotate()
	}
	if err == nil {
		s := r.state.Load()
		r.cfg.Logger.LogAttrs(ctx, slog.LevelInfo, "rotated",
			slog.String(keySPIFFEID, r.cfg.ID.String()), slog.String(keyTrigger, string(a.trigger)),
			slog.String(keyInitiator, a.actor.Initiator),
			slog.String(keyOldSerial, rec.OldSerial), slog.String(keySerial, rec.NewSerial),
			slog.Time(keyNotAfter, rec.NotAfter), slog.Time(keyRenewAt, s.renewAt))
	}
	return res, err
}

// newKey makes the key of an attempt and records it as pre-activation.
func (r *Rotator) newKey(ctx context.Context, trigger Trigger) (crypto.Signer, uint64, error) {
	key, err := r.cfg.Keys.NewKey(ctx)
	if err != nil {
		return nil, 0, fmt.Errorf("rotator: new key: %w", err)
	}
	r.version++
	r.recordMu.Lock()
	defer r.recordMu.Unlock()
	r.record(ctx, change{version: r.version, to: StatePreActivation, cause: Cause(trigger)})
	return key, r.version, nil
}

func (r *Rotator) obtain(ctx context.Context, a attempt, key crypto.Signer) (*x509svid.SVID, error) {
	var certs []*x509.Certificate
	var err error
	if a.auth != nil {
		certs, err = r.cfg.Issuer.Renew(ctx, a.auth.svid, key)
	} else {
		certs, err = r.cfg.Issuer.Enroll(ctx, r.cfg.ID, key)
	}
	if err != nil {
		if a.auth == nil && permanent(err) {
			err = fmt.Errorf("%w: %w", ErrEnrolmentRefused, err)
		}
		return nil, fmt.Errorf("rotator: %s %s: %w", a.trigger, r.cfg.ID, err)
	}
	return checkAnswer(r.cfg.ID, key, certs, r.state.Load().bundle, time.Now())
}

// discard destroys the key of a failed attempt; c is its credential when a
// certificate was obtained (and then refused), else nil.
func (r *Rotator) discard(ctx context.Context, version uint64, key crypto.Signer, c *credential) {
	if err := r.destroyKey(ctx, key); err != nil {
		r.cfg.Logger.LogAttrs(ctx, slog.LevelError, "key not destroyed",
			slog.String(keySPIFFEID, r.cfg.ID.String()), slog.Uint64(keyVersion, version), slog.Any(keyErr, err))
		return
	}
	ch := change{version: version, from: StatePreActivation, to: StateDestroyed, cause: CauseFailed}
	if c != nil {
		ch.serial, ch.notAfter = c.serial, c.notAfter()
	}
	r.recordMu.Lock()
	defer r.recordMu.Unlock()
	r.record(ctx, ch)
}

// publish makes c the current credential (active) and moves the previous one into
// overlap (or, if it has expired, retires it), unless c is revoked or was renewed from
// a revoked SVID (a.auth: nil for an enrolment).
func (r *Rotator) publish(ctx context.Context, c *credential, a attempt, now time.Time) error {
	r.recordMu.Lock()
	defer r.recordMu.Unlock()
	r.mu.Lock()
	if err := r.refuseRevoked(c, a.auth); err != nil {
		r.mu.Unlock()
		return err
	}
	s := r.state.Load()
	p := r.policy.Load()
	active := c.to(StateActive, Cause(a.trigger), now)
	changes := []change{changed(active, StatePreActivation)}
	next := &snapshot{current: active, bundle: s.bundle}
	retired := s.retired
	var jobs []job
	if prev := s.current; prev != nil {
		switch {
		case prev.retiring:
			retired = prepend(prev, retired)
		case expired(prev.notAfter(), now):
			gone, j := r.retire(prev, CauseExpired, now)
			retired, jobs = prepend(gone, retired), append(jobs, j)
		default:
			o := prev.to(StateOverlap, Cause(a.trigger), now)
			o.overlapUntil, o.endCause = overlapEnd(now, prev.notAfter(), p.Overlap)
			next.overlap = append(next.overlap, o)
			changes = append(changes, changed(o, prev.state))
		}
	}
	if d := s.dropped; d != nil {
		// Revoked or compromised: never back in overlap; it is (or will be) retired.
		retired = prepend(d, retired)
	}
	// Overlaps that have just ended are retired by the loop's next endOverlaps.
	next.overlap = append(next.overlap, s.overlap...)
	next.retired = pruneRetired(retired)
	leaf := active.svid.Certificates[0]
	next.renewAt = RenewAt(leaf.NotBefore, leaf.NotAfter, *p, r.cfg.Rand.Float64())
	r.state.Store(next)
	r.metrics.published(next)
	r.enqueue(jobs...)
	r.mu.Unlock()
	r.record(ctx, changes...)
	return nil
}

func (r *Rotator) publishFailure(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := *r.state.Load()
	s.lastErr, s.attempts = err, s.attempts+1
	s.needsToken = errors.Is(err, ErrEnrolmentRefused)
	r.state.Store(&s)
	r.metrics.published(&s)
}

// reschedule applies a new policy to what is held: the renewal time of the current
// SVID (with a new jitter draw) and the overlap ends of superseded ones.
func (r *Rotator) reschedule(now time.Time, l *loopState) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.state.Load()
	p := r.policy.Load()
	next := *s
	if c := s.current; c != nil && !expired(c.notAfter(), now) {
		leaf := c.svid.Certificates[0]
		next.renewAt = RenewAt(leaf.NotBefore, leaf.NotAfter, *p, r.cfg.Rand.Float64())
		if s.attempts == 0 {
			// Not retrying a failure: the new renewal time is the next attempt.
			l.next = next.renewAt
		}
	}
	next.overlap = mapCredentials(s.overlap, func(o *credential) *credential {
		n := *o
		n.overlapUntil, n.endCause = overlapEnd(o.since, o.notAfter(), p.Overlap)
		return &n
	})
	r.state.Store(&next)
	r.metrics.published(&next)
}

// sleepUntil waits until t, a wake-up, a Rotate request (returned) or ctx is done,
// reporting whether ctx is still live.
func (r *Rotator) sleepUntil(ctx context.Context, t time.Time) (*rotateCall, bool) {
	d := time.Until(t)
	if d <= 0 {
		// Due now; a request already waiting still goes first.
		select {
		case <-ctx.Done():
			return nil, false
		case call := <-r.calls:
			return call, true
		default:
			return nil, true
		}
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return nil, false
	case <-timer.C:
	case <-r.wake:
	case call := <-r.calls:
		return call, true
	}
	return nil, true
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}
