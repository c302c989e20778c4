package ca

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/agentmesh/agentmesh/meshapi"
	"log/slog"
	"net/http"
	"time"

	"github.com/agentmesh/agentmesh/audit"
)

const (
	// adminReinstatePath and meshReinstatePath take a ReinstateRequest: the admin
	// socket and, for /admin/* SVIDs, the mesh API.
	adminReinstatePath = "/reinstate"
	// actionReinstate marks an audit.Revocation record as a reinstatement.
	actionReinstate = "reinstate"
)

// ErrNotRevoked is returned by Reinstate (and answered 409 by the APIs) for an
// identity that is not revoked, or was reinstated already.
var ErrNotRevoked = errors.New("ca: identity not revoked")

// Reinstate lets a revoked identity be enrolled again, for actor (recorded like
// Revoke's). From then on the CA issues tokens, registration entries and certificates
// for it again, but every certificate issued before the revocation stays refused: the
// CA refuses to renew or register one (their NotBefore is before the cutoff), and the
// deny-list keeps denying them until they have all expired. Nothing is published: the
// list already says exactly that.
//
// Errors wrap ErrInvalidRequest or ErrInvalidID (bad request), ErrNotRevoked or
// ErrServerClosed. Every call is audited (an audit.Revocation with action
// "reinstate") and logged.
func (s *Server) Reinstate(ctx context.Context, actor audit.Actor, req meshapi.ReinstateRequest) (*meshapi.ReinstateResult, error) {
	res, err := s.reinstate(req)
	rec := audit.Revocation{Actor: actor, Action: actionReinstate, SPIFFEID: req.SPIFFEID,
		Reason: req.Reason, Result: "ok"}
	attrs := []slog.Attr{slog.String(keyInitiator, actor.Initiator), slog.String(keySPIFFEID, req.SPIFFEID),
		slog.String(keyReason, req.Reason)}
	switch {
	case err == nil:
		s.log.LogAttrs(ctx, slog.LevelInfo, "reinstated", append(attrs, slog.Time(keyCutoff, res.Cutoff))...)
	case reinstateRefused(err):
		rec.Result, rec.Error = "refused", err.Error()
		s.log.LogAttrs(ctx, slog.LevelInfo, "reinstatement refused", append(attrs, slog.String(keyErr, err.Error()))...)
	default:
		rec.Result, rec.Error = "error", err.Error()
		s.log.LogAttrs(ctx, slog.LevelError, "reinstatement failed", append(attrs, slog.String(keyErr, err.Error()))...)
	}
	s.audit(rec)
	return res, err
}

func reinstateRefused(err error) bool {
	return errors.Is(err, ErrInvalidRequest) || errors.Is(err, ErrInvalidID) || errors.Is(err, ErrNotRevoked)
}

func (s *Server) reinstate(req meshapi.ReinstateRequest) (*meshapi.ReinstateResult, error) {
	id, err := req.Check(s.cfg.TrustDomain)
	if err != nil {
		return nil, err
	}
	// Serialised with revocations: a reinstatement never interleaves with the
	// revocation of the same identity.
	s.deny.mu.Lock()
	defer s.deny.mu.Unlock()
	s.mu.Lock()
	closed := s.state == stateClosed
	s.mu.Unlock()
	if closed {
		return nil, ErrServerClosed
	}
	if m, ok := s.db.rev.all().ids[id]; ok && !m.reinstated() {
		if m.Cutoff.IsZero() {
			// Its list entry denies every certificate of the identity, for good:
			// certificates issued after a reinstatement would be refused anyway.
			return nil, fmt.Errorf("%w: %s was revoked without a cutoff, by an older version: it cannot be reinstated",
				ErrInvalidRequest, id)
		}
		// A certificate's NotBefore is written to the second, rounded down: one
		// issued in the second after the revocation could fall before the cutoff,
		// and storeIssued would refuse it. Reinstating only once that second has
		// passed (a wait only when an operator reinstates within it) makes the first
		// enrolment after a reinstatement always succeed.
		if d := time.Until(m.Cutoff.Truncate(time.Second).Add(time.Second + s.db.rev.backdate)); d > 0 {
			time.Sleep(d)
		}
	}
	m, ok, err := s.db.rev.reinstate(id, req.Reason, time.Now())
	if err != nil {
		return nil, fmt.Errorf("ca: reinstate: %w", err)
	}
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrNotRevoked, id)
	}
	return &meshapi.ReinstateResult{SPIFFEID: id.String(), Cutoff: m.Cutoff, RevokedAt: m.RevokedAt, ReinstatedAt: m.ReinstatedAt}, nil
}

// reinstateStatus is the HTTP status answering a Reinstate error.
func reinstateStatus(err error) int {
	if errors.Is(err, ErrNotRevoked) {
		return http.StatusConflict
	}
	return revokeStatus(err)
}

// handleAdminReinstate is the admin socket's POST /reinstate (adminOnly has admitted
// the caller).
func (s *Server) handleAdminReinstate(w http.ResponseWriter, r *http.Request) {
	actor := adminActor(r)
	var req meshapi.ReinstateRequest
	if err := meshapi.DecodeStrict(http.MaxBytesReader(w, r.Body, adminMaxBody), &req); err != nil {
		msg := "invalid request body: " + err.Error()
		s.audit(refusedReinstatement(actor, nil, msg))
		writeAdminError(w, http.StatusBadRequest, msg)
		return
	}
	res, err := s.Reinstate(r.Context(), actor, req)
	if err != nil {
		writeAdminError(w, reinstateStatus(err), err.Error()) // logged and audited by Reinstate
		return
	}
	writeJSON(w, res)
}

// handleMeshReinstate is POST /mesh/v1/reinstate: operators (/admin/* SVIDs, not
// revoked) only.
func (s *Server) handleMeshReinstate(w http.ResponseWriter, r *http.Request) {
	id := callerID(r)
	actor := audit.TLSActor(r.TLS)
	var req meshapi.ReinstateRequest
	if err := meshapi.DecodeStrict(http.MaxBytesReader(w, r.Body, maxRevokeBody), &req); err != nil {
		msg := "invalid request body: " + err.Error()
		s.audit(refusedReinstatement(actor, nil, msg))
		s.refuse(w, r, http.StatusBadRequest, id, msg)
		return
	}
	var msg string
	switch {
	case s.db.rev.revoked(id, callerSerial(r), callerNotBefore(r)):
		msg = fmt.Errorf("%w: %s serial %s", ErrRevoked, id, callerSerial(r)).Error()
	case !isAdminID(id):
		msg = "only " + meshapi.AdminPathPrefix + "* identities may reinstate"
	}
	if msg != "" {
		s.audit(refusedReinstatement(actor, &req, msg))
		s.refuse(w, r, http.StatusForbidden, id, msg)
		return
	}
	res, err := s.Reinstate(r.Context(), actor, req)
	if err != nil {
		writeStepError(w, reinstateStatus(err), err.Error()) // logged and audited by Reinstate
		return
	}
	writeJSON(w, res)
}

// refusedReinstatement is the audit record of a reinstatement refused before it
// reached Reinstate.
func refusedReinstatement(actor audit.Actor, req *meshapi.ReinstateRequest, msg string) audit.Revocation {
	rec := audit.Revocation{Actor: actor, Action: actionReinstate, Result: "refused", Error: msg}
	if req != nil {
		rec.SPIFFEID, rec.Reason = req.SPIFFEID, req.Reason
	}
	return rec
}

// RequestReinstate asks the CA running with state directory stateDir, through its
// admin socket, to reinstate (what `agentmesh reinstate --state DIR` runs); see
// Server.Reinstate. A refusal is a *ResponseError with Op "reinstate": 400 for a bad
// request, 403 for a caller not allowed, 409 for an identity that is not revoked.
func RequestReinstate(ctx context.Context, stateDir string, req meshapi.ReinstateRequest) (*meshapi.ReinstateResult, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("ca: reinstate: %w", err)
	}
	b, err := adminRequest(ctx, stateDir, "reinstate", http.MethodPost, adminReinstatePath, body, meshapi.MaxResponse)
	if err != nil {
		return nil, err
	}
	return meshapi.DecodeReinstateResult(b)
}
