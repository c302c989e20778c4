package rotator

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/policy"
)

// RotateRequest asks for a rotation outside the schedule.
type RotateRequest struct {
	// Trigger is why: TriggerOperator, TriggerCompromise, TriggerConfig, TriggerFleet
	// or TriggerAnchor. TriggerCompromise implies Compromised.
	Trigger Trigger
	// Actor says who asked: audit.PeerUIDActor for an operator at a control socket,
	// {Initiator: "ca"} for a fleet command, "sighup" for a configuration change.
	// Actor.Initiator is required.
	Actor audit.Actor
	// Reason is free text for the audit record.
	Reason string
	// Compromised says the current key must not be trusted any more: it is taken out
	// of presentation at once (state compromised, not overlap), its connections are
	// drained without grace and it is destroyed once the rotation is over.
	Compromised bool
}

// RotateResult says what a rotation replaced. Versions are the key versions of the
// key_state audit records; zero and "" mean none.
type RotateResult struct {
	OldSerial, NewSerial   string
	OldVersion, NewVersion uint64
}

func (q RotateRequest) validate() error {
	switch q.Trigger {
	case TriggerOperator, TriggerCompromise, TriggerConfig, TriggerFleet, TriggerAnchor:
	default:
		return fmt.Errorf("%w: unknown trigger %q", ErrBadRequest, q.Trigger)
	}
	if q.Actor.Initiator == "" {
		return fmt.Errorf("%w: no initiator", ErrBadRequest)
	}
	return nil
}

// rotateCall carries one Rotate request to Run's goroutine and its answer back.
type rotateCall struct {
	req   RotateRequest
	reply chan rotateReply // buffer of one: the loop never waits for the caller
}

type rotateReply struct {
	res RotateResult
	err error
}

// Rotate renews now, outside the schedule, and returns when the new SVID is published
// (or the attempt failed). trigger is one of "operator", "compromise", "config",
// "fleet", "anchor"; req.Actor says who ("uid:1000", "ca", "sighup"); reason is free text for
// the audit record. With compromised the current key goes to "compromised" instead of
// "overlap" and the returned serial is the one to revoke at the CA.
//
// The rotation is made by Run's goroutine, one at a time with the scheduled ones: a
// valid current SVID authenticates the renewal (a compromised one too: the CA has not
// revoked it yet, and the new key is ours), otherwise the identity enrols. With
// Compromised the current SVID stops being presented before the renewal starts (the
// identity is not ready until it succeeds) and RotateResult.OldSerial is set even when
// the rotation fails: revoke it anyway; Run then keeps re-enrolling with backoff.
//
// Rotate waits for Run; it returns ctx's error if ctx ends first (the rotation may
// still complete) and ErrStopped once Run has returned. Safe for concurrent use.
func (r *Rotator) Rotate(ctx context.Context, req RotateRequest) (RotateResult, error) {
	if err := req.validate(); err != nil {
		return RotateResult{}, err
	}
	if req.Trigger == TriggerCompromise {
		req.Compromised = true
	}
	call := &rotateCall{req: req, reply: make(chan rotateReply, 1)}
	select {
	case r.calls <- call:
	case <-ctx.Done():
		return RotateResult{}, fmt.Errorf("rotator: rotate: %w", ctx.Err())
	case <-r.stopped:
		return RotateResult{}, ErrStopped
	}
	select {
	case rep := <-call.reply:
		return rep.res, rep.err
	case <-ctx.Done():
		return RotateResult{}, fmt.Errorf("rotator: rotate: %w", ctx.Err())
	}
}

// serve makes the rotation call asks for, on Run's goroutine.
func (r *Rotator) serve(ctx context.Context, call *rotateCall, l *loopState) {
	req := call.req
	now := time.Now()
	s := r.state.Load()
	a := attempt{trigger: req.Trigger, actor: req.Actor, reason: req.Reason, old: s.current}
	if a.old == nil {
		a.old = s.dropped
	}
	if c := s.current; c != nil && !expired(c.notAfter(), now) && !l.reenroll {
		a.auth = c
	}
	var compromised *credential
	if req.Compromised && s.current != nil {
		compromised = r.compromise(ctx, s.current.version, now)
		// Before the renewal: a crash now must not restore the compromised SVID.
		r.syncStore(ctx)
		if compromised != nil {
			a.old = compromised
			// The loop must not start a re-enrolment of its own for this drop.
			l.handled = compromised.version
			if a.auth != nil {
				a.auth = compromised
			}
		}
	}
	res, err := r.rotate(ctx, a)
	if compromised != nil {
		// Only now: the renewal above authenticated with the key.
		r.markRetiring(compromised.version, CauseCompromise, time.Now())
	}
	switch {
	case err == nil:
		l.reenroll, l.restored, l.next = false, false, r.state.Load().renewAt
	case compromised != nil:
		// Nothing is presented: retry like the loop's own failures, by enrolment.
		l.reenroll, l.next = true, r.retryAt(r.state.Load(), time.Now())
	case a.auth != nil && permanent(err):
		l.reenroll = true
	}
	call.reply <- rotateReply{res: res, err: err}
}

// compromise takes the current credential (version v) out of presentation at once, as
// compromised. It returns the dropped credential, or nil when v is no longer current
// (a Revoke dropped it meanwhile). Its key stays until markRetiring, unless it expired
// and is already being retired.
func (r *Rotator) compromise(ctx context.Context, v uint64, now time.Time) *credential {
	r.recordMu.Lock()
	defer r.recordMu.Unlock()
	r.mu.Lock()
	s := r.state.Load()
	c := s.current
	if c == nil || c.version != v {
		r.mu.Unlock()
		return nil
	}
	d := c
	var changes []change
	if c.state != StateDestroyed { // else expired, drained and destroyed already
		d = c.to(StateCompromised, CauseCompromise, now)
		changes = append(changes, changed(d, c.state))
		if c.retiring {
			// Expired and being drained: its own job destroys it; cut the grace.
			d.drainBy = now
			r.enqueue(job{version: c.version, serial: c.serial, grace: 0})
		}
	}
	next := *s
	next.current, next.dropped, next.dropCause = nil, d, CauseCompromise
	next.renewAt, next.lastErr, next.attempts = time.Time{}, nil, 0
	r.state.Store(&next)
	r.metrics.published(&next)
	r.mu.Unlock()
	r.record(ctx, changes...)
	r.cfg.Logger.LogAttrs(ctx, slog.LevelError, "svid key compromised",
		slog.String(keySPIFFEID, r.cfg.ID.String()), slog.Uint64(keyVersion, d.version),
		slog.String(keySerial, d.serial))
	return d
}

// SetPolicy replaces the rotation policy (config reload); the schedule is recomputed:
// the current SVID's renewal time (with a new jitter draw), the overlap ends of
// superseded SVIDs (from their rotation time) and the usage threshold, which rotates
// at once if the current key already reached it. An invalid policy is refused with a
// *policy.FieldError and the old one kept. Safe for concurrent use.
func (r *Rotator) SetPolicy(p policy.RotationPolicy) error {
	if err := p.Validate(); err != nil {
		return err
	}
	p = p.WithDefaults()
	r.policy.Store(&p)
	r.policyChanged.Store(true)
	r.signal()
	r.cfg.Logger.LogAttrs(context.Background(), slog.LevelInfo, "rotation policy changed",
		slog.String(keySPIFFEID, r.cfg.ID.String()), slog.Any(keyPolicy, p))
	return nil
}

// SetBundle replaces the trust anchors of the identity's trust domain (the operator
// added or removed a CA): peers and the CA's answers are verified against the new
// bundle from the next handshake and the next renewal on. It refuses a bundle of
// another trust domain or with no authority.
//
// Every change of anchors, and every refused bundle, is an audit record
// (audit.TrustBundle) with the old and new anchor fingerprints and versions; a
// bundle with the same anchors changes nothing and records nothing.
func (r *Rotator) SetBundle(b *x509bundle.Bundle) error {
	var err error
	switch {
	case b == nil || b.Empty():
		err = fmt.Errorf("%w: a bundle with at least one authority is required", ErrBadRequest)
	case b.TrustDomain() != r.cfg.ID.TrustDomain():
		err = fmt.Errorf("%w: bundle of %s, not of %s", ErrBadRequest, b.TrustDomain(), r.cfg.ID.TrustDomain())
	}
	if err != nil {
		r.auditBundle(r.bundleChange(r.state.Load().bundle, nil, err))
		return err
	}
	r.mu.Lock()
	next := *r.state.Load()
	old := next.bundle
	next.bundle = b
	r.state.Store(&next)
	r.mu.Unlock()
	if old.Equal(b) {
		return nil
	}
	r.auditBundle(r.bundleChange(old, b, nil))
	r.cfg.Logger.LogAttrs(context.Background(), slog.LevelInfo, "trust bundle changed",
		slog.String(keySPIFFEID, r.cfg.ID.String()), slog.Int("authorities", len(b.X509Authorities())))
	return nil
}
