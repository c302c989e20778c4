package rotator

import (
	"context"
	"crypto"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
)

// Key states, after NIST SP 800-57 (audit.KeyPhase): a key is made (pre-activation),
// certified and presented (active), superseded but still the credential of the
// connections it authenticated (overlap), then destroyed once those are drained; or
// compromised at any point, and then destroyed without grace.
const (
	StatePreActivation = audit.PhasePreActivation
	StateActive        = audit.PhaseActive
	StateOverlap       = audit.PhaseOverlap
	StateCompromised   = audit.PhaseCompromised
	StateDestroyed     = audit.PhaseDestroyed
)

// Cause is why a key entered its state (audit.KeyState.Cause). A key made, certified
// or superseded by a rotation carries the rotation's Trigger as its cause.
type Cause string

// Causes of key state transitions besides the triggers.
const (
	CauseFailed     Cause = "failed"                 // the attempt the key was made for failed
	CauseOverlapEnd Cause = "overlap_end"            // Policy.Overlap after the rotation has passed
	CauseExpired          = Cause(TriggerExpired)    // the certificate expired
	CauseRevoked          = Cause(TriggerRevoked)    // Revoke: a deny-list names the SVID
	CauseCompromise       = Cause(TriggerCompromise) // Rotate with Compromised
	// CauseRestored: the key of the SVID Config.StateFile held, found again in the key
	// store when Run started; it was made, and became active, in an earlier process.
	CauseRestored Cause = "restored"
	// CauseOrphan: a key found in the key store at start that no stored SVID names,
	// left by a process that ended before destroying it (DestroyOrphans).
	CauseOrphan Cause = "orphan"
)

const (
	// keepDestroyed is how many destroyed credentials, the newest, Status still lists.
	keepDestroyed = 8
	// destroyTimeout bounds one KeyStore.Destroy, which also runs during shutdown.
	destroyTimeout = 30 * time.Second
)

// overlapEnd returns when a credential superseded at rotated leaves overlap, and the
// cause recorded then: overlap after the rotation, or the certificate's notAfter when
// overlap is zero or reaches past it (a credential never outlives its certificate).
func overlapEnd(rotated, notAfter time.Time, overlap time.Duration) (time.Time, Cause) {
	if overlap > 0 {
		if end := rotated.Add(overlap); end.Before(notAfter) {
			return end, CauseOverlapEnd
		}
	}
	return notAfter, CauseExpired
}

// drainGrace is how long the connections of a credential retired for cause get before
// they are closed: none for a revoked or compromised one, which must stop at once.
func drainGrace(cause Cause, grace time.Duration) time.Duration {
	if cause == CauseRevoked || cause == CauseCompromise {
		return 0
	}
	return grace
}

// drainDeadline is when the last connection on a credential retired at start for
// cause has been closed: no connection outlives its credential by more than that.
func drainDeadline(start time.Time, cause Cause, grace time.Duration) time.Time {
	return start.Add(drainGrace(cause, grace))
}

// usageDue reports whether a key that signed n handshakes is due for rotation under
// the threshold limit (0: the usage trigger is off).
func usageDue(n, limit uint64) bool {
	return limit > 0 && n >= limit
}

// change is one key state transition to record.
type change struct {
	version  uint64
	serial   string
	notAfter time.Time
	from, to audit.KeyPhase
	cause    Cause
}

// changed describes c's entry into its current state from from.
func changed(c *credential, from audit.KeyPhase) change {
	ch := change{version: c.version, serial: c.serial, from: from, to: c.state, cause: c.cause}
	if c.svid != nil {
		ch.notAfter = c.notAfter()
	}
	return ch
}

// record writes one audit record and one log line per change, in order. Callers hold
// recordMu (and not mu: the audit log may apply backpressure).
func (r *Rotator) record(ctx context.Context, changes ...change) {
	for _, ch := range changes {
		r.metrics.transition(string(ch.to))
		if r.cfg.Audit != nil {
			err := r.cfg.Audit.Append(&audit.KeyState{
				Key: audit.KeySVID, SPIFFEID: r.cfg.ID.String(), Version: ch.version, Serial: ch.serial,
				From: ch.from, To: ch.to, Cause: string(ch.cause), NotAfter: ch.notAfter,
			})
			if err != nil {
				r.cfg.Logger.LogAttrs(ctx, slog.LevelError, "audit key state", slog.Any(keyErr, err))
			}
		}
		r.cfg.Logger.LogAttrs(ctx, slog.LevelInfo, "key state",
			slog.String(keySPIFFEID, r.cfg.ID.String()), slog.Uint64(keyVersion, ch.version),
			slog.String(keySerial, ch.serial), slog.String(keyFrom, string(ch.from)),
			slog.String(keyTo, string(ch.to)), slog.String(keyCause, string(ch.cause)))
	}
}

// job is the drain and destruction of one retired credential, run on a goroutine of
// its own so that a drain's grace never holds up the rotation loop.
type job struct {
	version uint64
	serial  string
	key     crypto.Signer
	grace   time.Duration
	destroy bool  // false: drain only (the credential's destruction is another job's)
	cause   Cause // of the destroyed record, unless the credential is compromised by then
}

// retire returns c marked as retiring at now and the job that drains it (grace by
// cause) and destroys its key.
func (r *Rotator) retire(c *credential, cause Cause, now time.Time) (*credential, job) {
	policyGrace := r.policy.Load().DrainGrace
	grace := drainGrace(cause, policyGrace)
	n := *c
	n.retiring, n.drainBy = true, drainDeadline(now, cause, policyGrace)
	return &n, job{version: c.version, serial: c.serial, key: c.key, grace: grace, destroy: true, cause: cause}
}

// enqueue hands jobs to Run's retiring goroutine. Callers hold mu.
func (r *Rotator) enqueue(jobs ...job) {
	if len(jobs) == 0 {
		return
	}
	r.pending = append(r.pending, jobs...)
	select {
	case r.retireWake <- struct{}{}:
	default: // a wake-up is already pending
	}
}

func (r *Rotator) takeJobs() []job {
	r.mu.Lock()
	defer r.mu.Unlock()
	jobs := r.pending
	r.pending = nil
	return jobs
}

// runRetirer starts every job handed to it, each on its own goroutine, until loopDone
// is closed; it then starts the jobs left (their drains see ctx done and are skipped,
// their keys are still destroyed, so an HSM does not keep them) and returns once all
// have finished.
func (r *Rotator) runRetirer(ctx context.Context, loopDone <-chan struct{}) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		stop := false
		select {
		case <-r.retireWake:
		case <-loopDone:
			stop = true
		}
		for _, j := range r.takeJobs() {
			wg.Go(func() { r.runJob(ctx, j) })
		}
		if stop {
			return
		}
	}
}

func (r *Rotator) runJob(ctx context.Context, j job) {
	if r.cfg.Drain != nil && ctx.Err() == nil {
		closed := r.cfg.Drain(ctx, j.serial, j.grace)
		r.metrics.drained.Add(float64(closed))
		r.cfg.Logger.LogAttrs(ctx, slog.LevelInfo, "credential drained",
			slog.String(keySPIFFEID, r.cfg.ID.String()), slog.Uint64(keyVersion, j.version),
			slog.String(keySerial, j.serial), slog.Duration(keyGrace, j.grace), slog.Int(keyClosed, closed))
	}
	if !j.destroy {
		return
	}
	if err := r.destroyKey(ctx, j.key); err != nil {
		r.cfg.Logger.LogAttrs(ctx, slog.LevelError, "key not destroyed",
			slog.String(keySPIFFEID, r.cfg.ID.String()), slog.Uint64(keyVersion, j.version),
			slog.String(keySerial, j.serial), slog.Any(keyErr, err))
		return
	}
	r.destroyed(ctx, j.version, j.cause, time.Now())
}

// destroyKey destroys key even when ctx is done: shutdown must not leave keys behind
// in an HSM.
func (r *Rotator) destroyKey(ctx context.Context, key crypto.Signer) error {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), destroyTimeout)
	defer cancel()
	if err := r.cfg.Keys.Destroy(dctx, key); err != nil {
		r.metrics.destroyFailures.Inc()
		return fmt.Errorf("rotator: destroy key: %w", err)
	}
	return nil
}

// destroyed records that the key of version v was destroyed at now. A compromised
// credential keeps the cause it was compromised for.
func (r *Rotator) destroyed(ctx context.Context, v uint64, cause Cause, now time.Time) {
	r.recordMu.Lock()
	defer r.recordMu.Unlock()
	r.mu.Lock()
	var ch change
	next, ok := r.state.Load().update(v, func(c *credential) *credential {
		if c.state == StateDestroyed {
			return nil
		}
		why := cause
		if c.state == StateCompromised {
			why = c.cause
		}
		d := c.to(StateDestroyed, why, now)
		// Keep what Status shows and Revoke matches; drop every reference to the key.
		d.key, d.cert = nil, nil
		d.svid = &x509svid.SVID{ID: c.svid.ID, Certificates: c.svid.Certificates}
		ch = changed(d, c.state)
		return d
	})
	if ok {
		next.retired = pruneRetired(next.retired)
		r.state.Store(next)
	}
	r.mu.Unlock()
	if ok {
		r.record(ctx, ch)
	}
}

// update returns a copy of s in which the credential with version v is replaced by
// f(it) wherever it is held, and whether anything changed (f returns nil to leave it).
func (s *snapshot) update(v uint64, f func(*credential) *credential) (*snapshot, bool) {
	next := *s
	changed := false
	// A version is held in one place at most, so f runs once at most.
	swap := func(c *credential) *credential {
		if c == nil || c.version != v {
			return c
		}
		if n := f(c); n != nil {
			changed = true
			return n
		}
		return c
	}
	next.current = swap(s.current)
	next.dropped = swap(s.dropped)
	next.overlap = mapCredentials(s.overlap, swap)
	next.retired = mapCredentials(s.retired, swap)
	return &next, changed
}

func mapCredentials(cs []*credential, f func(*credential) *credential) []*credential {
	if len(cs) == 0 {
		return cs
	}
	out := make([]*credential, len(cs))
	for i, c := range cs {
		out[i] = f(c)
	}
	return out
}

// pruneRetired keeps every credential still retiring and the keepDestroyed newest
// destroyed ones.
func pruneRetired(cs []*credential) []*credential {
	kept := make([]*credential, 0, len(cs))
	destroyed := 0
	for _, c := range cs {
		if c.state == StateDestroyed {
			if destroyed == keepDestroyed {
				continue
			}
			destroyed++
		}
		kept = append(kept, c)
	}
	return kept
}

// endOverlaps retires the superseded SVIDs whose overlap has ended and the current one
// once it has expired: each is drained and its key destroyed on Run's retiring
// goroutine.
func (r *Rotator) endOverlaps(now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.state.Load()
	next := *s
	var jobs []job
	var ended []*credential
	next.overlap = nil
	for _, o := range s.overlap {
		if now.Before(o.overlapUntil) {
			next.overlap = append(next.overlap, o)
			continue
		}
		c, j := r.retire(o, o.endCause, now)
		ended, jobs = append(ended, c), append(jobs, j)
	}
	if c := s.current; c != nil && !c.retiring && expired(c.notAfter(), now) {
		// Nothing renewed it in time: it is still held (the identity reports it
		// expired) but its connections are drained and its key is destroyed, so none
		// outlives the certificate by more than the drain grace.
		var j job
		next.current, j = r.retire(c, CauseExpired, now)
		jobs = append(jobs, j)
	}
	if len(jobs) == 0 {
		return
	}
	next.retired = pruneRetired(append(ended, s.retired...))
	r.state.Store(&next)
	r.metrics.published(&next)
	r.enqueue(jobs...)
}

// markRetiring schedules the drain and destruction of the credential with version v
// (a compromised key, once the attempt it authenticated is over).
func (r *Rotator) markRetiring(v uint64, cause Cause, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var j job
	next, ok := r.state.Load().update(v, func(c *credential) *credential {
		if c.retiring || c.state == StateDestroyed {
			return nil
		}
		var n *credential
		n, j = r.retire(c, cause, now)
		return n
	})
	if ok {
		r.state.Store(next)
		r.enqueue(j)
	}
}

// prepend returns c followed by cs, in a new slice.
func prepend(c *credential, cs []*credential) []*credential {
	return slices.Insert(slices.Clone(cs), 0, c)
}
