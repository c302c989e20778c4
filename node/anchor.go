package node

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/policy"
	"github.com/agentmesh/agentmesh/rotator"
)

// metricAnchorAcked is the last step of a rotation of the CA's anchors this proxy
// acknowledged: its rotation ID, labelled by phase (one series at a time).
const metricAnchorAcked = "agentmesh_proxy_anchor_step_acked_rotation_id"

// anchorRetry bounds the backoff of a step's renewals and acknowledgements: short, since
// the CA's gate waits for them, and capped well under a heartbeat window.
var anchorRetry = policy.RotationPolicy{RetryMin: 500 * time.Millisecond, RetryMax: 10 * time.Second}

var (
	// errStepBundle: the bundle in force lacks a root of the step's bundle.
	errStepBundle = errors.New("the bundle in force lacks a root the rotation step publishes")
	// errProbe: the step's probe chain does not verify with the bundle in force.
	errProbe = errors.New("the rotation step's probe does not verify with the bundle in force")
)

// anchorAcker acknowledges a step to the CA (the mesh client); StaleStep reports
// whether AckAnchor's error says the step is no longer current, which no retry fixes.
type anchorAcker interface {
	AckAnchor(ctx context.Context, ack meshapi.AnchorAck) error
	StaleStep(err error) bool
}

// anchorStep is a step to converge to: the published step and the roots of its bundle.
type anchorStep struct {
	meshapi.AnchorRotation
	roots []*x509.Certificate
}

// sameStep reports whether a and b are the same step (nil: none).
func sameStep(a, b *meshapi.AnchorRotation) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.ID == b.ID && a.Phase == b.Phase && a.BundleVersion == b.BundleVersion
}

// anchorFollower is what following rotations of the CA's anchors needs: the latest
// step for followAnchors to take, renewals to recompute the bundle in force after, the
// CA to acknowledge to and the metric of the last step acknowledged.
type anchorFollower struct {
	// acker is set once the mesh client is built, before anything runs.
	acker anchorAcker
	acked *prometheus.GaugeVec
	steps chan *anchorStep // the latest step (nil: none); buffered 1, replaced, never queued
	// renewed is signalled by every rotator after it published a new SVID; buffered
	// 1, coalesced.
	renewed chan struct{}
}

func newAnchorFollower(reg prometheus.Registerer) anchorFollower {
	acked := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: metricAnchorAcked,
		Help: "The ID of the last rotation of the CA's trust anchors this proxy acknowledged a step of, by phase."},
		[]string{"phase"})
	if reg != nil {
		reg.MustRegister(acked)
	}
	return anchorFollower{acked: acked, steps: make(chan *anchorStep, 1),
		renewed: make(chan struct{}, 1)}
}

// follow hands the latest step (nil: none) to followAnchors, replacing one not yet
// taken.
func (f *anchorFollower) follow(s *anchorStep) {
	for {
		select {
		case f.steps <- s:
			return
		default:
		}
		select {
		case <-f.steps:
		default:
		}
	}
}

// onRotate is every rotator's OnRotate: it never blocks the rotation.
func (f *anchorFollower) onRotate() {
	select {
	case f.renewed <- struct{}{}:
	default:
	}
}

// followAnchors runs the work of each step until the next step (or none) arrives or
// ctx is done, and recomputes the bundle in force after each renewal; it returns once
// the last step's work has exited.
func (a *applier) followAnchors(ctx context.Context) error {
	stop := func() {}
	defer func() { stop() }()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-a.anchor.renewed:
			a.recomputeBundle()
		case s := <-a.anchor.steps:
			stop()
			stop = a.startStep(ctx, s)
		}
	}
}

// startStep runs s's work (none for nil) on a goroutine and returns what cancels it
// and waits for it.
func (a *applier) startStep(ctx context.Context, s *anchorStep) (stop func()) {
	if s == nil {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.convergeStep(ctx, *s)
	}()
	return func() { cancel(); <-done }
}

// followAnchor starts the work of a new step published in the mesh state (nil: none).
func (a *applier) followAnchor(r *meshapi.AnchorRotation, roots []*x509.Certificate) {
	if r == nil {
		a.anchor.follow(nil)
		return
	}
	a.log.Info("anchor rotation step", "rotation_id", r.ID, "phase", r.Phase, "bundle_version", r.BundleVersion,
		"issuer", r.Issuer)
	a.anchor.follow(&anchorStep{AnchorRotation: *r, roots: roots})
}

// convergeStep does this proxy's part in step s: check the bundle in force holds the
// step's bundle and verifies its probe, renew every SVID not issued by its issuer, and
// acknowledge. The outcome is audited; a failed probe is not acknowledged.
func (a *applier) convergeStep(ctx context.Context, s anchorStep) {
	rec := audit.AnchorStep{SPIFFEID: a.rot.ID().String(), RotationID: s.ID, Phase: string(s.Phase),
		BundleVersion: s.BundleVersion, Issuer: s.Issuer}
	if err := checkStep(s, a.bundleInForce(), time.Now()); err != nil {
		rec.Result, rec.Error = audit.AnchorStepProbeFailed, err.Error()
		a.log.Error("anchor rotation step not acknowledged", "rotation_id", s.ID, "phase", s.Phase, "err", err)
		a.auditStep(rec)
		return
	}
	var err error
	if rec.Renewed, err = a.renewForIssuer(ctx, s); err != nil {
		return // the step ended: a newer one or shutdown
	}
	a.recomputeBundle()
	rec.Attempts, err = a.ackStep(ctx, s)
	switch {
	case ctx.Err() != nil:
		return
	case err != nil:
		rec.Result, rec.Error = audit.AnchorStepRefused, err.Error()
		a.log.Warn("anchor rotation step refused by the ca", "rotation_id", s.ID, "phase", s.Phase, "err", err)
	default:
		rec.Result = audit.AnchorStepAcked
		a.anchor.acked.Reset()
		a.anchor.acked.WithLabelValues(string(s.Phase)).Set(float64(s.ID))
		a.log.Info("anchor rotation step acknowledged", "rotation_id", s.ID, "phase", s.Phase,
			"renewed", len(rec.Renewed), "attempts", rec.Attempts)
	}
	a.auditStep(rec)
}

func (a *applier) auditStep(rec audit.AnchorStep) {
	if err := a.auditor.Append(rec); err != nil {
		a.log.Error("audit anchor rotation step", "err", err)
	}
}

// checkStep verifies that bundle (the one in force) holds every root of s's bundle and
// verifies s's probe chain at now. Pure.
func checkStep(s anchorStep, bundle *x509bundle.Bundle, now time.Time) error {
	for _, r := range s.roots {
		if !bundle.HasX509Authority(r) {
			return fmt.Errorf("%w: %s", errStepBundle, r.Subject)
		}
	}
	if s.Probe == "" {
		return nil
	}
	chain, err := parseChain(s.Probe)
	if err == nil {
		_, _, err = x509svid.Verify(chain, bundle, x509svid.WithTime(now))
	}
	if err != nil {
		return fmt.Errorf("%w: %w", errProbe, err)
	}
	return nil
}

// parseChain parses a PEM chain, leaf first.
func parseChain(p string) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	rest := []byte(p)
	for {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no certificate")
	}
	return out, nil
}

// issuedBy reports whether svid's issuing CA certificate (chain[1]) has the key named
// fingerprint.
func issuedBy(svid *x509svid.SVID, fingerprint string) bool {
	return len(svid.Certificates) > 1 && meshapi.KeyFingerprint(svid.Certificates[1]) == fingerprint
}

// renewForIssuer renews, each after a uniformly random delay below the step's renew
// window, every SVID held that s.Issuer did not issue, retrying until it did; it
// returns the identities renewed, or ctx's error once the step ended.
func (a *applier) renewForIssuer(ctx context.Context, s anchorStep) ([]string, error) {
	if s.Issuer == "" {
		return nil, nil
	}
	var (
		mu      sync.Mutex
		renewed []string
		wg      sync.WaitGroup
	)
	for _, h := range a.rotators() {
		svid, err := h.GetX509SVID()
		if err != nil || issuedBy(svid, s.Issuer) {
			continue // none yet (it enrols from the issuer in force) or already the issuer's
		}
		wg.Go(func() {
			if a.renewOne(ctx, h, s) {
				mu.Lock()
				renewed = append(renewed, h.ID().String())
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return renewed, ctx.Err()
}

// renewOne waits a random delay below the renew window, then rotates h until its SVID
// is s.Issuer's; false when ctx ended first or h stopped (an agent unregistered
// meanwhile holds nothing to renew).
func (a *applier) renewOne(ctx context.Context, h *rotator.Rotator, s anchorStep) bool {
	var delay time.Duration
	if w := s.RenewWindow(); w > 0 {
		delay = rand.N(w) //nolint:gosec // G404: spreads renewals over the window; nothing secret
	}
	req := rotator.RotateRequest{Trigger: rotator.TriggerAnchor, Actor: audit.Actor{Initiator: "ca"},
		Reason: fmt.Sprintf("anchor rotation %d %s", s.ID, s.Phase)}
	for attempt := 0; ; attempt++ {
		if !sleep(ctx, delay) {
			return false
		}
		_, err := h.Rotate(ctx, req)
		if errors.Is(err, rotator.ErrStopped) {
			return false
		}
		if svid, serr := h.GetX509SVID(); err == nil && serr == nil && issuedBy(svid, s.Issuer) {
			return true
		}
		a.log.Warn("renewal for the anchor rotation's issuer failed, will retry", "spiffe_id", h.ID().String(),
			"rotation_id", s.ID, "attempt", attempt+1, "err", err)
		delay = rotator.Backoff(attempt+1, anchorRetry, rand.Float64()) //nolint:gosec // G404: jitter
	}
}

// ackStep acknowledges s until the CA accepts it, says the step is stale, or ctx ends;
// it returns the attempts made and the CA's last refusal of a stale step.
func (a *applier) ackStep(ctx context.Context, s anchorStep) (int, error) {
	ack := meshapi.AnchorAck{ID: s.ID, Phase: s.Phase, BundleVersion: s.BundleVersion}
	for attempt := 1; ; attempt++ {
		err := a.anchor.acker.AckAnchor(ctx, ack)
		if err == nil || a.anchor.acker.StaleStep(err) || ctx.Err() != nil {
			return attempt, err
		}
		wait := rotator.Backoff(attempt, anchorRetry, rand.Float64()) //nolint:gosec // G404: jitter
		a.log.Warn("anchor rotation acknowledgement failed, will retry", "rotation_id", s.ID, "phase", s.Phase,
			"attempt", attempt, "retry_in", wait, "err", err)
		if !sleep(ctx, wait) {
			return attempt, ctx.Err()
		}
	}
}

// rotators are the rotators held: the host's, then every agent's.
func (a *applier) rotators() []*rotator.Rotator {
	return append([]*rotator.Rotator{a.rot}, a.agents.rotators()...)
}

// sleep waits d or until ctx is done; it reports whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d): // collected once unreferenced, even if ctx ends first
		return true
	}
}
