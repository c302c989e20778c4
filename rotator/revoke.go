package rotator

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// denied remembers what Revoke was told, so that no later certificate brings a revoked
// credential back: neither a renewal authenticated by a revoked SVID that was in flight
// when Revoke ran, nor a certificate the CA issues for a denied serial or identity.
type denied struct {
	serials map[string]time.Time // serials dropped -> NotAfter, forgotten once expired
	latest  func(id spiffeid.ID, serial string, notBefore time.Time) bool
}

// has reports whether c must not be used. Callers hold Rotator.mu.
func (d *denied) has(c *credential) bool {
	if _, ok := d.serials[c.serial]; ok {
		return true
	}
	return d.latest != nil && d.latest(c.svid.ID, c.serial, c.notBefore())
}

// add records the dropped credentials and forgets those expired at now: an expired
// certificate is never presented nor renewed, so remembering it protects nothing.
func (d *denied) add(dropped []*credential, now time.Time) {
	if d.serials == nil {
		d.serials = make(map[string]time.Time, len(dropped))
	}
	for s, notAfter := range d.serials {
		if expired(notAfter, now) {
			delete(d.serials, s)
		}
	}
	for _, c := range dropped {
		d.serials[c.serial] = c.notAfter()
	}
}

// Revoke drops every SVID this rotator holds (current and overlap) for which denied
// (given its SPIFFE ID, serial and NotBefore) returns true, and returns how many it dropped; an SVID denied returns false for is
// untouched. When the current one is dropped the rotator stops presenting it at once:
// TLSCertificate and GetX509SVID fail with ErrRevoked, Ready reports false, Status shows
// it, and the run loop re-enrols at once (trigger "revoked", audited), retrying with the
// usual backoff when the CA refuses (a revoked identity's enrolment is refused until
// it is reinstated: the loop keeps its capped backoff and never panics or spins). A later successful
// enrolment makes the identity ready again.
//
// Every dropped SVID goes to state "compromised" (cause "revoked"); Run then drains its
// connections without grace and destroys its key. A superseded SVID already being
// drained is marked compromised too and drained again without grace, but not counted.
//
// The rotator keeps denied (the latest one given) and the dropped serials: a certificate
// obtained afterwards that denied refuses, or a renewal authenticated by a dropped SVID,
// is refused like any bad answer and never presented. Deny-lists are cumulative, so each
// call may replace the previous predicate. denied is called with an internal lock held:
// it must be quick, safe for concurrent use, and must not call back into the Rotator.
// A nil denied drops nothing. Safe for concurrent use.
func (r *Rotator) Revoke(denied func(id spiffeid.ID, serial string, notBefore time.Time) bool) int {
	if denied == nil {
		return 0
	}
	r.recordMu.Lock()
	defer r.recordMu.Unlock()
	r.mu.Lock()
	r.deny.latest = denied
	now := time.Now()
	s := r.state.Load()
	next := *s
	var dropped []*credential
	var changes []change
	var jobs []job
	compromise := func(c *credential) *credential {
		d, j := r.retire(c.to(StateCompromised, CauseRevoked, now), CauseRevoked, now)
		changes, jobs = append(changes, changed(d, c.state)), append(jobs, j)
		return d
	}
	current := false
	retired := s.retired
	if c := s.current; c != nil && denied(c.svid.ID, c.serial, c.notBefore()) {
		switch {
		case c.state == StateDestroyed:
			// Expired, drained and destroyed already: only stop holding it.
			next.dropped = c
		case c.retiring:
			// Expired and being drained: its own job destroys it; cut the grace.
			d := c.to(StateCompromised, CauseRevoked, now)
			d.drainBy = now
			next.dropped = d
			changes = append(changes, changed(d, c.state))
			jobs = append(jobs, job{version: c.version, serial: c.serial, grace: 0})
		default:
			next.dropped = compromise(c)
		}
		next.dropCause = CauseRevoked
		if s.dropped != nil {
			retired = prepend(s.dropped, retired)
		}
		// The failed attempts counted so far were against the dropped SVID; the
		// re-enrolment starts a fresh backoff.
		next.current = nil
		next.renewAt, next.lastErr, next.attempts = time.Time{}, nil, 0
		dropped = append(dropped, c)
		current = true
	}
	next.overlap = nil
	var gone []*credential
	for _, o := range s.overlap {
		if !denied(o.svid.ID, o.serial, o.notBefore()) {
			next.overlap = append(next.overlap, o)
			continue
		}
		dropped = append(dropped, o)
		gone = append(gone, compromise(o))
	}
	next.retired = nil
	for _, o := range retired {
		if o.state == StateDestroyed || o.state == StateCompromised || !denied(o.svid.ID, o.serial, o.notBefore()) {
			next.retired = append(next.retired, o)
			continue
		}
		// Its overlap has ended and its drain is running with the usual grace: close
		// its connections now; the running job still destroys the key.
		d := o.to(StateCompromised, CauseRevoked, now)
		d.drainBy = now
		changes = append(changes, changed(d, o.state))
		jobs = append(jobs, job{version: o.version, serial: o.serial, grace: 0})
		next.retired = append(next.retired, d)
	}
	next.retired = append(gone, next.retired...)
	if len(changes) == 0 && len(dropped) == 0 {
		r.mu.Unlock()
		return 0
	}
	r.deny.add(dropped, now)
	r.state.Store(&next)
	r.metrics.published(&next)
	r.enqueue(jobs...)
	r.mu.Unlock()
	r.record(context.Background(), changes...)
	if len(dropped) == 0 {
		return 0
	}

	r.metrics.revoked.Add(float64(len(dropped)))
	if current {
		r.signal()
	}
	serials := make([]string, len(dropped))
	for i, c := range dropped {
		serials[i] = c.serial
	}
	level := slog.LevelWarn
	if current {
		level = slog.LevelError // the identity has nothing to present until re-enrolment
	}
	r.cfg.Logger.LogAttrs(context.Background(), level, "svid revoked",
		slog.String(keySPIFFEID, r.cfg.ID.String()), slog.Any(keySerials, serials),
		slog.Bool(keyCurrent, current))
	return len(dropped)
}

// refuseRevoked explains why c (obtained by renewing from, nil for an enrolment) must
// not be published, or returns nil. Callers hold r.mu.
func (r *Rotator) refuseRevoked(c, from *credential) error {
	switch {
	case from != nil && r.deny.has(from):
		// The renewal was in flight when Revoke dropped from: the CA may have answered
		// before it applied the revocation, so the answer inherits it.
		return fmt.Errorf("rotator: renewal authenticated by revoked svid %s: %w", from.serial, ErrRevoked)
	case r.deny.has(c):
		return fmt.Errorf("rotator: ca issued revoked svid %s: %w", c.serial, ErrRevoked)
	}
	return nil
}
