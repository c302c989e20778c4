package ca

import (
	"context"
	"crypto/x509"
	"fmt"
	"slices"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/ca/authority"
	"github.com/agentmesh/agentmesh/meshapi"
)

// anchorTick is how often the driver looks at the gates without being woken: the
// expiry gate, heartbeats and proxies joining need no event.
const anchorTick = time.Second

// maxAdvance bounds the phases one look may pass through (prepare → distribute, or
// destroy → done, at most): a guard against a gate that never stays shut.
const maxAdvance = 8

// resumeAnchorRotation re-runs the effects of the recorded phase (they are
// idempotent) and advances as far as the gates allow: what a CA killed in the middle
// of a rotation does before serving again.
func (s *Server) resumeAnchorRotation(now time.Time) {
	s.anchor.mu.Lock()
	defer s.anchor.mu.Unlock()
	if s.anchor.rec == nil {
		s.updateAnchorMetricsLocked(now)
		return
	}
	s.anchor.applied = false
	if !s.anchor.rec.Phase.Ended() {
		s.log.Info("ca rotation resumed", keyRotationID, s.anchor.rec.ID, keyPhase, s.anchor.rec.Phase)
	}
	s.advanceLocked(now)
}

// anchorLoop drives the running rotation until ctx is done: on every acknowledgement
// or exclusion, and every anchorTick for the gates that wait on time or heartbeats.
func (s *Server) anchorLoop(ctx context.Context) {
	t := time.NewTicker(anchorTick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.anchor.wake:
		}
		s.tickAnchor(time.Now())
	}
}

// joinProxiesLocked makes every proxy the CA knows a member of rec (reporting whether
// one joined) and refreshes their heartbeats: those registered in the directory, and
// those following it without advertising (a proxy that only originates still has to
// trust the new anchor before anyone presents it), by their last long-poll, within the
// directory's TTL.
func (s *Server) joinProxiesLocked(rec *anchorRecord, now time.Time) bool {
	joined := false
	for _, p := range s.dir.snapshot(now).Peers {
		joined = rec.join(p.SPIFFEID, p.LastHeartbeat) || joined
	}
	for id, at := range s.watches.followers(now, now.Add(-s.cfg.DirectoryTTL)) {
		joined = rec.join(id, at.UTC()) || joined
	}
	return joined
}

// tickAnchor admits the proxies registered or following since the rotation started as members,
// refreshes the members' heartbeats, advances when a gate opens and updates the
// metrics.
func (s *Server) tickAnchor(now time.Time) {
	s.anchor.mu.Lock()
	defer s.anchor.mu.Unlock()
	if rec := s.anchor.rec; rec != nil && !rec.Phase.Ended() {
		if s.joinProxiesLocked(rec, now) {
			if err := s.saveAnchorLocked(rec); err != nil {
				s.log.Error("ca rotation: members not persisted", keyErr, err)
			}
		}
	}
	s.advanceLocked(now)
}

// advanceLocked runs the effects of the current phase if they have not run, then
// enters the next phase while the gate is open (s.anchor.mu held). A failed effect is
// recorded, logged and audited once per distinct error, and retried on the next look.
func (s *Server) advanceLocked(now time.Time) {
	defer s.updateAnchorMetricsLocked(now)
	for range maxAdvance {
		rec := s.anchor.rec
		if rec == nil {
			return
		}
		if !s.anchor.applied {
			began := time.Now()
			if err := s.applyLocked(rec, now); err != nil {
				s.effectFailedLocked(rec, err)
				return
			}
			// The effects' time (an HSM deleting keys, say) counts in the phase.
			now = now.Add(time.Since(began))
			s.anchor.applied, s.anchor.failure, rec.Error = true, "", ""
			if err := s.saveAnchorLocked(rec); err != nil {
				s.log.Error("ca rotation: step not persisted", keyErr, err)
			}
		}
		if rec.Phase.Ended() || rec.waiting(now, s.cfg.SVIDLifetime, backdate(s.cfg.SVIDLifetime)) != "" {
			return
		}
		if !s.enterLocked(nextAnchorPhase(rec.Phase), now) {
			return
		}
	}
}

func (s *Server) effectFailedLocked(rec *anchorRecord, err error) {
	rec.Error = err.Error()
	if s.anchor.failure == rec.Error {
		return
	}
	s.anchor.failure = rec.Error
	s.log.Error("ca rotation: effects of the phase failed; retrying", keyRotationID, rec.ID, keyPhase, rec.Phase, keyErr, err)
	s.audit(audit.CARotation{Action: audit.CARotationEffect, RotationID: rec.ID, AnchorKind: string(rec.Kind),
		Phase: string(rec.Phase), Actor: audit.Actor{Initiator: initiatorCA}, Result: audit.ResultError, Error: rec.Error})
}

// enterLocked moves the rotation to phase p, persisted before any of p's effects run;
// it reports whether it could (a record that cannot be written stays where it was).
func (s *Server) enterLocked(p meshapi.AnchorPhase, now time.Time) bool {
	rec := s.anchor.rec
	next := *rec
	next.Members, next.Phases, next.Published = slices.Clone(rec.Members), slices.Clone(rec.Phases), slices.Clone(rec.Published)
	next.enter(p, now.UTC())
	from := rec.Phase
	left := next.Phases[len(next.Phases)-1]
	// On disk before the phase is: a CA killed between the two enters the phase again
	// on restart and records it twice, never not at all.
	if err := s.auditDurable(audit.CARotation{Action: audit.CARotationPhase, RotationID: next.ID,
		AnchorKind: string(next.Kind), Phase: string(p), From: string(from), Actor: audit.Actor{Initiator: initiatorCA},
		Result: audit.ResultOK, PhaseDuration: left.End.Sub(left.Start)}); err != nil {
		s.effectFailedLocked(rec, fmt.Errorf("audit: %w", err))
		return false
	}
	if err := s.saveAnchorLocked(&next); err != nil {
		s.effectFailedLocked(rec, err)
		return false
	}
	s.anchor.rec, s.anchor.applied = &next, false
	s.log.Info("ca rotation phase", keyRotationID, next.ID, keyPhase, p, keyFrom, from, keyDuration,
		time.Duration(left.MS)*time.Millisecond)
	return true
}

// applyLocked runs the effects of rec's phase. Each is idempotent: a CA killed after
// some of them re-runs them all.
func (s *Server) applyLocked(rec *anchorRecord, now time.Time) error {
	a := s.anchor.auth
	switch rec.Phase {
	case meshapi.PhasePrepare:
		return s.prepareLocked(rec)
	case meshapi.PhaseDistribute, meshapi.PhaseRetire, meshapi.PhaseAbortRetire:
		return s.publishStepLocked(rec)
	case meshapi.PhaseActivate:
		if err := a.Activate(); err != nil {
			return fmt.Errorf("activate: %w", err)
		}
		if err := s.denyIssuer(now, nil); err != nil {
			return err
		}
		return s.publishStepLocked(rec)
	case meshapi.PhaseAbort:
		if !rec.Reverted.IsZero() {
			if err := a.Revert(); err != nil {
				return fmt.Errorf("revert: %w", err)
			}
			if err := s.denyIssuer(now, nil); err != nil {
				return err
			}
		}
		return s.publishStepLocked(rec)
	case meshapi.PhaseDestroy:
		if err := a.DestroyPrevious(); err != nil {
			return fmt.Errorf("destroy: %w", err)
		}
		return s.endLocked(rec, now, rec.OldIssuer, rec.OldIssuerNotAfter)
	case meshapi.PhaseAborted:
		if err := a.DiscardNext(); err != nil {
			return fmt.Errorf("discard: %w", err)
		}
		if rec.Reverted.IsZero() {
			return s.endLocked(rec, now, "", time.Time{})
		}
		return s.endLocked(rec, now, rec.NewIssuer, rec.NewIssuerNotAfter)
	case meshapi.PhaseDone:
		s.dir.setAnchorRotation(nil)
	}
	return nil
}

// prepareLocked generates the next generation (reusing what an interrupted prepare
// made) and records the fingerprints of both intermediates.
func (s *Server) prepareLocked(rec *anchorRecord) error {
	next, err := s.anchor.auth.Prepare(rec.Kind)
	if err != nil {
		return fmt.Errorf("prepare: %w", err)
	}
	old := s.anchor.auth.Active().Intermediate
	rec.OldIssuer, rec.OldIssuerNotAfter = meshapi.KeyFingerprint(old), old.NotAfter
	rec.NewIssuer, rec.NewIssuerNotAfter = meshapi.KeyFingerprint(next.Intermediate), next.Intermediate.NotAfter
	return nil
}

// endLocked ends a rotation: the issuer the rotation retired (fingerprint, "" for
// none) goes on the deny-list until its certificate expires (notAfter), the anchors are those of the active generation, and
// the directory no longer carries a step.
func (s *Server) endLocked(rec *anchorRecord, now time.Time, issuer string, notAfter time.Time) error {
	if issuer != "" {
		e := &meshapi.DeniedIssuer{KeyFingerprint: issuer, RevokedAt: now.UTC().Round(0),
			NotAfter: notAfter.UTC().Round(0)}
		if err := s.denyIssuer(now, e); err != nil {
			return err
		}
	}
	anchors := []*x509.Certificate{s.anchor.auth.Active().Root}
	s.anchor.auth.SetAnchors(anchors)
	s.dir.setBundle(anchors)
	s.dir.setAnchorRotation(nil)
	rec.Bundle = meshapi.BundleVersion(anchors)
	return nil
}

// denyIssuer publishes the next deny-list version, signed by the active intermediate,
// with issuer when not nil. With nil it only re-signs the list, when the list in force
// is signed by another key: what proxies verify from now on. Idempotent.
func (s *Server) denyIssuer(now time.Time, issuer *meshapi.DeniedIssuer) error {
	s.deny.mu.Lock()
	defer s.deny.mu.Unlock()
	cur := s.deny.Load()
	switch {
	case issuer == nil && slices.Equal(cur.signed.Signer, s.anchor.auth.Active().Intermediate.Raw):
		return nil
	case issuer != nil && cur.list.DeniesIssuer(issuer.KeyFingerprint):
		return nil
	}
	if _, err := s.putDenyList(cur.list.WithIssuer(now, issuer)); err != nil {
		return fmt.Errorf("deny-list: %w", err)
	}
	return nil
}

// stepGenerations are the replaced (old) and the new generation of a rotation in
// phase p, as the authority holds them.
func (s *Server) stepGenerations(p meshapi.AnchorPhase) (old, nw authority.Generation, err error) {
	a := s.anchor.auth
	if newActive(p) {
		if prev, ok := a.Previous(); ok {
			return prev, a.Active(), nil
		}
	} else if next, ok := a.Next(); ok {
		return a.Active(), next, nil
	}
	return old, nw, fmt.Errorf("%w: the authority holds no generation to rotate to or from in phase %s", ErrHSM, p)
}

// publishStepLocked puts in force the trust bundle of rec's phase (the CA trusts it
// before any proxy is told), then publishes the step proxies converge to: the bundle,
// the issuer their SVIDs must come from, and a probe chain under the anchor they must
// hold.
func (s *Server) publishStepLocked(rec *anchorRecord) error {
	old, nw, err := s.stepGenerations(rec.Phase)
	if err != nil {
		return err
	}
	both := []*x509.Certificate{old.Root}
	if !nw.Root.Equal(old.Root) {
		both = append(both, nw.Root)
	}
	anchors, issuer, probeGen := both, rec.NewIssuer, nw
	switch rec.Phase {
	case meshapi.PhaseDistribute:
		issuer = ""
	case meshapi.PhaseRetire:
		anchors = []*x509.Certificate{nw.Root}
	case meshapi.PhaseAbort:
		issuer, probeGen = rec.OldIssuer, old
	case meshapi.PhaseAbortRetire:
		anchors, issuer, probeGen = []*x509.Certificate{old.Root}, rec.OldIssuer, old
	default: // activate: both anchors, the new issuer
	}
	probe, err := s.anchor.auth.Probe(probeGen)
	if err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	s.anchor.auth.SetAnchors(anchors)
	s.dir.setBundle(anchors)
	rec.Bundle = meshapi.BundleVersion(anchors)
	if !slices.Contains(rec.Published, rec.Bundle) {
		rec.Published = append(rec.Published, rec.Bundle)
	}
	s.dir.setAnchorRotation(&meshapi.AnchorRotation{ID: rec.ID, Kind: rec.Kind, Phase: rec.Phase,
		BundleVersion: rec.Bundle, Issuer: issuer, Probe: probe, RenewWindowMS: rec.RenewWindowMS})
	return nil
}
