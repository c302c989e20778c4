package ca

import (
	"bytes"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/ca/authority"
	"github.com/agentmesh/agentmesh/internal/atomicfile"
	"github.com/agentmesh/agentmesh/meshapi"
)

// A rotation of the CA's trust anchors moves through the phases of meshapi.AnchorPhase:
// the record of anchorstate.go decides, this file persists and serialises, and
// anchoreffects.go acts (authority generations, trust bundle, directory, deny-list).

// fileAnchorRotation is the rotation in progress, or the last one.
const fileAnchorRotation = "rotation.json"

// initiatorCA names the coordinator's own steps in audit records.
const initiatorCA = "ca"

// errStaleAck refuses an acknowledgement of another step than the current one (409).
var errStaleAck = errors.New("ca: acknowledgement of a step that is not the current one")

// errNotConverged refuses an acknowledgement from a certificate the step's issuer did
// not issue (412): the proxy has not renewed yet.
var errNotConverged = errors.New("ca: acknowledgement from a certificate of another issuer")

// anchorAuthority is what the coordinator needs of the authority's generations of keys
// and certificates. *authority.Authority implements it; tests wrap it to inject an HSM
// failure.
type anchorAuthority interface {
	Active() authority.Generation
	Next() (authority.Generation, bool)
	Previous() (authority.Generation, bool)
	Prepare(meshapi.AnchorKind) (authority.Generation, error)
	Activate() error
	Revert() error
	DestroyPrevious() error
	DiscardNext() error
	SetAnchors([]*x509.Certificate)
	Anchors() []*x509.Certificate
	Probe(authority.Generation) (string, error)
}

// anchorStore is the rotation of the trust anchors: the record (current or last one),
// whether the effects of its phase have run since it was loaded, and the driver's
// wake-up.
type anchorStore struct {
	// mu serialises every change of the record, held across its file write and the
	// effects of a phase (HSM, files): each builds on the state the previous one left,
	// and nothing on a hot path takes it.
	mu      sync.Mutex
	auth    anchorAuthority
	rec     *anchorRecord // guarded by mu; nil: no rotation ever
	applied bool          // guarded by mu: the effects of rec.Phase ran since load
	failure string        // guarded by mu: the last effect failure audited
	wake    chan struct{} // coalesced: an acknowledgement or an exclusion arrived
	metrics *anchorMetrics
}

// loadAnchorRotation reads StateDir/rotation.json, if any (New: nothing else runs
// yet, so s.anchor.mu need not be held). A rotation in progress is
// resumed by Run (resumeAnchorRotation) before it serves. A file that does not parse
// stops New: it is written atomically, so it was tampered with.
func (s *Server) loadAnchorRotation() error {
	if s.anchor.auth == nil {
		s.anchor.auth = s.auth
	}
	s.anchor.wake = make(chan struct{}, 1)
	s.anchor.metrics = newAnchorMetrics()
	// The anchors' expiry is exported from the start, rotation or not.
	defer s.updateAnchorMetricsLocked(time.Now())
	path := filepath.Join(s.cfg.StateDir, fileAnchorRotation)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read rotation: %w", err)
	}
	var rec anchorRecord
	if err := meshapi.DecodeStrict(bytes.NewReader(b), &rec); err != nil {
		return fmt.Errorf("rotation %s: %w", path, err)
	}
	if rec.ID == 0 || rec.Phase == "" {
		return fmt.Errorf("rotation %s: malformed", path)
	}
	s.anchor.rec = &rec
	return nil
}

// saveAnchorLocked persists rec (s.anchor.mu held), or removes the file for nil.
func (s *Server) saveAnchorLocked(rec *anchorRecord) error {
	path := filepath.Join(s.cfg.StateDir, fileAnchorRotation)
	if rec == nil {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("ca: rotation: %w", err)
		}
		return nil
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("ca: rotation: %w", err)
	}
	if err := atomicfile.Write(path, b, 0o644); err != nil {
		return fmt.Errorf("ca: rotation: %w", err)
	}
	return nil
}

// wakeAnchor has the driver look at the rotation now.
func (s *Server) wakeAnchor() {
	select {
	case s.anchor.wake <- struct{}{}:
	default:
	}
}

// StartAnchorRotation starts a rotation of the trust anchors (see docs/ca-rotation.md)
// and returns its status. It runs prepare synchronously: the new key(s) are generated
// in the HSM and the new certificates persisted, then the rotation enters distribute.
// When prepare fails (the HSM refusing key generation, say) nothing is left of the
// rotation and the error wraps ErrHSM. A rotation running already is refused with
// ErrRotationInProgress naming its phase; a bad request with ErrInvalidRequest.
// Every outcome is audited.
func (s *Server) StartAnchorRotation(actor audit.Actor, req meshapi.RotateRequest) (meshapi.RotationStatus, error) {
	st, err := s.startAnchorRotation(actor, req, time.Now())
	if err == nil {
		return st, nil // audited before its first phase change
	}
	rec := audit.CARotation{Action: audit.CARotationStart, AnchorKind: string(req.Kind), Actor: actor,
		Reason: req.Reason, Result: audit.ResultRefused, Error: err.Error()}
	if errors.Is(err, ErrInvalidRequest) || errors.Is(err, ErrRotationInProgress) {
		s.log.Info("ca rotation refused", keyInitiator, actor.Initiator, keyErr, err)
	} else {
		rec.Result = audit.ResultError
		s.log.Error("ca rotation failed in prepare; nothing changed", keyInitiator, actor.Initiator, keyErr, err)
	}
	s.audit(rec)
	return st, err
}

func (s *Server) startAnchorRotation(actor audit.Actor, req meshapi.RotateRequest, now time.Time) (meshapi.RotationStatus, error) {
	if err := s.checkRotateRequest(req); err != nil {
		return meshapi.RotationStatus{}, err
	}
	s.anchor.mu.Lock()
	defer s.anchor.mu.Unlock()
	prev := s.anchor.rec
	if prev != nil && !prev.Phase.Ended() {
		return meshapi.RotationStatus{}, fmt.Errorf("%w: %s", ErrRotationInProgress, prev.current())
	}
	rec := s.newAnchorRecord(prev, actor, req, now)
	if err := s.auditDurable(audit.CARotation{Action: audit.CARotationPhase, RotationID: rec.ID,
		AnchorKind: string(rec.Kind), Phase: string(rec.Phase), Actor: actor, Result: audit.ResultOK}); err != nil {
		return meshapi.RotationStatus{}, fmt.Errorf("ca: rotation: audit: %w", err)
	}
	// Persisted before the HSM is touched: a crash in prepare resumes it.
	if err := s.saveAnchorLocked(rec); err != nil {
		return meshapi.RotationStatus{}, err
	}
	if err := s.prepareLocked(rec); err != nil {
		// Leave no rotation: the previous record (or none) is in force again. The
		// generation is not persisted when key generation fails.
		if serr := s.saveAnchorLocked(prev); serr != nil {
			return meshapi.RotationStatus{}, errors.Join(err, serr)
		}
		return meshapi.RotationStatus{}, fmt.Errorf("ca: rotation: %w", err)
	}
	s.anchor.rec, s.anchor.applied, s.anchor.failure = rec, true, ""
	s.log.Info("ca rotation started", keyRotationID, rec.ID, keyKind, rec.Kind, keyInitiator, actor.Initiator)
	s.audit(audit.CARotation{Action: audit.CARotationStart, RotationID: rec.ID, AnchorKind: string(rec.Kind),
		Phase: string(rec.Phase), Actor: actor, Reason: req.Reason, Result: audit.ResultOK})
	for _, id := range req.Exclude {
		s.auditExclude(rec, actor, id, req.Reason)
	}
	// Prepare's time (the HSM's key generation) counts in its phase.
	now = time.Now()
	s.advanceLocked(now)
	return s.anchorStatusLocked(now), nil
}

// newAnchorRecord is the record of a rotation req starts at now after prev (nil:
// none), in prepare: its members are the proxies in the directory or following it,
// and those req excludes.
func (s *Server) newAnchorRecord(prev *anchorRecord, actor audit.Actor, req meshapi.RotateRequest, now time.Time) *anchorRecord {
	var prevID uint64
	if prev != nil {
		prevID = prev.ID
	}
	rec := &anchorRecord{ID: nextAnchorID(prevID, now), Kind: req.Kind, Phase: meshapi.PhasePrepare,
		Started: now.UTC(), Since: now.UTC(), Initiator: actor.Initiator, Reason: req.Reason,
		RenewWindowMS: req.RenewWindowMS, Members: []anchorMember{}}
	if rec.RenewWindowMS == 0 {
		rec.RenewWindowMS = s.cfg.RotationRenewWindow.Milliseconds()
	}
	s.joinProxiesLocked(rec, now)
	for _, id := range req.Exclude {
		rec.exclude(id)
	}
	return rec
}

// checkRotateRequest validates an operator's request.
func (s *Server) checkRotateRequest(req meshapi.RotateRequest) error {
	switch {
	case req.Kind != meshapi.RotateIntermediate && req.Kind != meshapi.RotateRoot:
		return fmt.Errorf("%w: kind %q: intermediate or root", ErrInvalidRequest, req.Kind)
	case !meshapi.ValidReason(req.Reason):
		return fmt.Errorf("%w: reason: at most %d printable ASCII characters", ErrInvalidRequest, meshapi.MaxReason)
	case req.RenewWindowMS < 0 || time.Duration(req.RenewWindowMS)*time.Millisecond >= s.cfg.SVIDLifetime:
		return fmt.Errorf("%w: renew window %dms is outside [0, SVID lifetime %v)", ErrInvalidRequest,
			req.RenewWindowMS, s.cfg.SVIDLifetime)
	}
	for _, id := range req.Exclude {
		if err := s.checkHostID(id); err != nil {
			return err
		}
	}
	return nil
}

// checkHostID refuses an ID that cannot name a proxy of this trust domain.
func (s *Server) checkHostID(id spiffeid.ID) error {
	if !id.MemberOf(s.cfg.TrustDomain) || !meshapi.IsHostID(id) {
		return fmt.Errorf("%w: %q is not a host ID of %s", ErrInvalidRequest, id, s.cfg.TrustDomain.Name())
	}
	return nil
}

// AbortAnchorRotation aborts the running rotation: before retire only (else, and
// with no rotation running, ErrRotationInProgress naming the phase). From distribute
// or activate it enters abort (the old key issues again, proxies acknowledge); from
// prepare (a CA that crashed in it) it discards the new keys at once. Audited.
func (s *Server) AbortAnchorRotation(actor audit.Actor, reason string) (meshapi.RotationStatus, error) {
	now := time.Now()
	s.anchor.mu.Lock()
	defer s.anchor.mu.Unlock()
	rec := s.anchor.rec
	ev := audit.CARotation{Action: audit.CARotationAbort, Actor: actor, Reason: reason, Result: audit.ResultOK}
	if rec != nil {
		ev.RotationID, ev.AnchorKind, ev.Phase = rec.ID, string(rec.Kind), string(rec.Phase)
	}
	if rec == nil || !abortable(rec.Phase) {
		err := fmt.Errorf("%w: %s: only prepare, distribute and activate can be aborted", ErrRotationInProgress, rec.current())
		ev.Result, ev.Error = audit.ResultRefused, err.Error()
		s.audit(ev)
		return meshapi.RotationStatus{}, err
	}
	s.audit(ev)
	s.log.Info("ca rotation aborted", keyRotationID, rec.ID, keyPhase, rec.Phase, keyInitiator, actor.Initiator)
	next := meshapi.PhaseAbort
	if rec.Phase == meshapi.PhasePrepare {
		next = meshapi.PhaseAborted
	}
	s.enterLocked(next, now)
	s.advanceLocked(now)
	return s.anchorStatusLocked(now), nil
}

// ExcludeFromAnchorRotation excludes host from the acknowledgements of the running
// rotation (ErrRotationInProgress when none runs); audited.
func (s *Server) ExcludeFromAnchorRotation(actor audit.Actor, ex meshapi.RotationExclude) (meshapi.RotationStatus, error) {
	if err := s.checkHostID(ex.Host); err != nil {
		return meshapi.RotationStatus{}, err
	}
	if !meshapi.ValidReason(ex.Reason) {
		return meshapi.RotationStatus{}, fmt.Errorf("%w: reason: at most %d printable ASCII characters",
			ErrInvalidRequest, meshapi.MaxReason)
	}
	now := time.Now()
	s.anchor.mu.Lock()
	defer s.anchor.mu.Unlock()
	rec := s.anchor.rec
	if rec == nil || rec.Phase.Ended() {
		return meshapi.RotationStatus{}, fmt.Errorf("%w: %s", ErrRotationInProgress, rec.current())
	}
	rec.exclude(ex.Host)
	if err := s.saveAnchorLocked(rec); err != nil {
		return meshapi.RotationStatus{}, err
	}
	s.auditExclude(rec, actor, ex.Host, ex.Reason)
	s.wakeAnchor()
	return s.anchorStatusLocked(now), nil
}

func (s *Server) auditExclude(rec *anchorRecord, actor audit.Actor, host spiffeid.ID, reason string) {
	s.log.Info("ca rotation member excluded", keyRotationID, rec.ID, keyHost, host.String(), keyInitiator, actor.Initiator)
	s.audit(audit.CARotation{Action: audit.CARotationExclude, RotationID: rec.ID, AnchorKind: string(rec.Kind),
		Phase: string(rec.Phase), Actor: actor, Host: host.String(), Reason: reason, Result: audit.ResultOK})
}

// AnchorRotationStatus is the running rotation, or the last one (ID 0: none ever).
func (s *Server) AnchorRotationStatus() meshapi.RotationStatus {
	s.anchor.mu.Lock()
	defer s.anchor.mu.Unlock()
	return s.anchorStatusLocked(time.Now())
}

func (s *Server) anchorStatusLocked(now time.Time) meshapi.RotationStatus {
	var st meshapi.RotationStatus
	if rec := s.anchor.rec; rec != nil {
		live := func(hb time.Time) bool { return !hb.IsZero() && now.Sub(hb) < s.cfg.RotationLiveWindow }
		st = rec.status(now, live, s.cfg.SVIDLifetime, backdate(s.cfg.SVIDLifetime))
	}
	for _, a := range s.anchor.auth.Anchors() {
		st.Anchors = append(st.Anchors, meshapi.AnchorInfo{Subject: a.Subject.String(),
			Fingerprint: meshapi.KeyFingerprint(a), NotAfter: a.NotAfter})
	}
	return st
}
