package ca

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

// Log keys of the rotation of the trust anchors.
const (
	keyRotationID = "ca_rotation_id"
	keyPhase      = "phase"
	keyFrom       = "from"
)

// maxAckBody bounds an acknowledgement's body.
const maxAckBody = 1 << 10

// ackStatus is the HTTP status an acknowledgement refused for reason gets.
func ackStatus(reason ackRefusal) int {
	switch reason {
	case ackStale:
		return http.StatusConflict
	case ackNotConverged:
		return http.StatusPreconditionFailed
	case ackNotHost:
		return http.StatusForbidden
	default: // unpublished bundle, malformed body
		return http.StatusBadRequest
	}
}

// handleAnchorAck is the mesh API's POST /rotation/ack: a proxy acknowledges the
// current step of the rotation with its host SVID. Accepted acknowledgements and
// refusals are audited.
func (s *Server) handleAnchorAck(w http.ResponseWriter, r *http.Request) {
	id := callerID(r)
	ev := audit.CARotation{Action: audit.CARotationAck, Actor: audit.TLSActor(r.TLS), Host: id.String(),
		Result: audit.ResultOK}
	refuse := func(reason ackRefusal, err error) {
		ev.Result, ev.Reason, ev.Error = audit.ResultRefused, string(reason), err.Error()
		s.audit(ev)
		s.refuse(w, r, ackStatus(reason), id, err.Error())
	}
	if !meshapi.IsHostID(id) {
		refuse(ackNotHost, fmt.Errorf("only %s* identities acknowledge rotation steps", meshapi.HostPathPrefix))
		return
	}
	var ack meshapi.AnchorAck
	if err := meshapi.DecodeStrict(http.MaxBytesReader(w, r.Body, maxAckBody), &ack); err != nil {
		refuse(ackMalformed, fmt.Errorf("invalid request body: %w", err))
		return
	}
	ev.RotationID, ev.Phase, ev.BundleVersion = ack.ID, string(ack.Phase), ack.BundleVersion
	if err := ack.Check(); err != nil {
		refuse(ackMalformed, err)
		return
	}
	kind, reason, recorded, err := s.ackAnchor(id, r.TLS.PeerCertificates[0], ack, ev, time.Now())
	ev.AnchorKind = string(kind)
	if err != nil {
		refuse(reason, err)
		return
	}
	if !recorded { // a repeated acknowledgement
		s.audit(ev)
	}
	writeJSON(w, ack)
}

// ackAnchor records id's acknowledgement of the current step, made with the
// certificate leaf; it returns the rotation's kind, or why it refused. A first
// acknowledgement of the step is audited (ev) durably before it is persisted, and
// recorded is true.
func (s *Server) ackAnchor(id spiffeid.ID, leaf *x509.Certificate, ack meshapi.AnchorAck, ev audit.CARotation, now time.Time) (_ meshapi.AnchorKind, _ ackRefusal, recorded bool, _ error) {
	s.anchor.mu.Lock()
	defer s.anchor.mu.Unlock()
	rec := s.anchor.rec
	if rec.repeated(id, ack) {
		return rec.Kind, "", false, nil
	}
	if reason, err := rec.checkAck(ack); err != nil {
		return "", reason, false, err
	}
	// On activate and abort the proxy says every SVID it holds comes from the step's
	// issuer, which is then the active intermediate: its own proves it or not.
	if ack.Phase == meshapi.PhaseActivate || ack.Phase == meshapi.PhaseAbort {
		if err := leaf.CheckSignatureFrom(s.anchor.auth.Active().Intermediate); err != nil {
			return rec.Kind, ackNotConverged, false, fmt.Errorf("%w: renew from the intermediate issuing in phase %s of rotation %d",
				errNotConverged, rec.Phase, rec.ID)
		}
	}
	if !rec.acked(id, now.UTC()) {
		return rec.Kind, "", false, nil
	}
	ev.AnchorKind = string(rec.Kind)
	if err := s.auditDurable(ev); err != nil {
		return rec.Kind, "", false, fmt.Errorf("audit: %w", err) // the proxy retries
	}
	if err := s.saveAnchorLocked(rec); err != nil {
		return rec.Kind, "", true, err // the proxy retries
	}
	s.log.Info("ca rotation acknowledged", keyRotationID, rec.ID, keyPhase, rec.Phase, keySPIFFEID, id.String())
	s.wakeAnchor()
	return rec.Kind, "", true, nil
}

// refusedRotationRecord is the audit record of a refused request to change the
// rotation through the admin socket, nil for other requests.
func refusedRotationRecord(r *http.Request, actor audit.Actor, msg string) audit.Event {
	if r.Method != http.MethodPost {
		return nil
	}
	var action audit.CARotationAction
	switch r.URL.Path {
	case meshapi.AdminRotationPath:
		action = audit.CARotationStart
	case meshapi.AdminRotationAbortPath:
		action = audit.CARotationAbort
	case meshapi.AdminRotationExcludePath:
		action = audit.CARotationExclude
	default:
		return nil
	}
	return audit.CARotation{Action: action, Actor: actor, Result: audit.ResultRefused, Error: msg}
}

// adminStatus maps the rotation API's errors to HTTP statuses.
func adminStatus(err error) int {
	switch {
	case errors.Is(err, ErrInvalidRequest):
		return http.StatusBadRequest
	case errors.Is(err, ErrRotationInProgress):
		return http.StatusConflict
	case errors.Is(err, ErrHSM):
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

// adminRotation is an admin socket handler of the rotation API: it decodes a T (an
// empty body is the zero T), calls call with the caller and answers its status.
func adminRotation[T any](call func(actor audit.Actor, req T) (meshapi.RotationStatus, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req T
		if !decodeAdmin(w, r, &req) {
			return
		}
		st, err := call(adminActor(r), req)
		answerAdmin(w, st, err)
	}
}

// abortAnchorRotation is AbortAnchorRotation for adminRotation.
func (s *Server) abortAnchorRotation(actor audit.Actor, req meshapi.RotationAbort) (meshapi.RotationStatus, error) {
	return s.AbortAnchorRotation(actor, req.Reason)
}

// handleAdminRotationStatus is the admin socket's GET /rotation.
func (s *Server) handleAdminRotationStatus(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, s.AnchorRotationStatus())
}

// decodeAdmin decodes an admin request's body into v (an empty body is an empty
// request), answering 400 when it cannot.
func decodeAdmin(w http.ResponseWriter, r *http.Request, v any) bool {
	if r.ContentLength == 0 {
		return true
	}
	if err := meshapi.DecodeStrict(http.MaxBytesReader(w, r.Body, adminMaxBody), v); err != nil {
		writeAdminError(w, http.StatusBadRequest, "invalid request body: "+err.Error())
		return false
	}
	return true
}

func answerAdmin(w http.ResponseWriter, st meshapi.RotationStatus, err error) {
	if err != nil {
		writeAdminError(w, adminStatus(err), err.Error())
		return
	}
	writeJSON(w, st)
}

// StartRotation asks the CA running with state directory stateDir, through its admin
// socket, to start a rotation of its trust anchors (`agentmesh ca rotate`); see
// Server.StartAnchorRotation. A refusal is a *meshapi.ResponseError with Op
// "rotation": 409 while one runs (naming its phase), 400 for a bad request, 503 when
// the HSM failed.
func StartRotation(ctx context.Context, stateDir string, req meshapi.RotateRequest) (*meshapi.RotationStatus, error) {
	return rotationRequest(ctx, stateDir, http.MethodPost, meshapi.AdminRotationPath, req)
}

// RotationStatus is the rotation of the trust anchors of the CA running with state
// directory stateDir, running or last (`agentmesh ca rotation status`).
func RotationStatus(ctx context.Context, stateDir string) (*meshapi.RotationStatus, error) {
	return rotationRequest(ctx, stateDir, http.MethodGet, meshapi.AdminRotationPath, nil)
}

// AbortRotation aborts the running rotation of the trust anchors (`agentmesh ca
// rotation abort`): 409 when none runs or it is past activate.
func AbortRotation(ctx context.Context, stateDir, reason string) (*meshapi.RotationStatus, error) {
	return rotationRequest(ctx, stateDir, http.MethodPost, meshapi.AdminRotationAbortPath,
		meshapi.RotationAbort{Reason: reason})
}

// ExcludeFromRotation excludes a proxy from the acknowledgements of the running
// rotation (`agentmesh ca rotation exclude ID`).
func ExcludeFromRotation(ctx context.Context, stateDir string, ex meshapi.RotationExclude) (*meshapi.RotationStatus, error) {
	return rotationRequest(ctx, stateDir, http.MethodPost, meshapi.AdminRotationExcludePath, ex)
}

func rotationRequest(ctx context.Context, stateDir, method, path string, body any) (*meshapi.RotationStatus, error) {
	var b []byte
	if body != nil {
		var err error
		if b, err = json.Marshal(body); err != nil {
			return nil, fmt.Errorf("ca: rotation: %w", err)
		}
	}
	ans, err := adminRequest(ctx, stateDir, "rotation", method, path, b, meshapi.MaxDirectoryResponse)
	if err != nil {
		return nil, err
	}
	var st meshapi.RotationStatus
	if err := json.Unmarshal(ans, &st); err != nil {
		return nil, fmt.Errorf("ca: rotation: malformed answer from the admin socket: %w", err)
	}
	return &st, nil
}
