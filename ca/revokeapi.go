package ca

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/agentmesh/agentmesh/meshapi"
	"net/http"
	"strings"

	"github.com/smallstep/nosql/database"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
)

// maxRevokeBody bounds a revoke request body (mesh API).
const maxRevokeBody = 4 << 10

// isAdminID reports whether id names an operator: /admin/<name>.
func isAdminID(id spiffeid.ID) bool {
	return strings.HasPrefix(id.Path(), meshapi.AdminPathPrefix) && len(id.Path()) > len(meshapi.AdminPathPrefix)
}

// refusedRevocation is the audit record of a revocation request refused before it
// reached Revoke (caller not allowed, unreadable body).
func refusedRevocation(actor audit.Actor, req *meshapi.RevokeRequest, msg string) audit.Revocation {
	rec := audit.Revocation{Actor: actor, Result: "refused", Error: msg}
	if req != nil {
		rec.SPIFFEID, rec.Serial, rec.Reason = req.SPIFFEID, req.Serial, req.Reason
	}
	return rec
}

// revokeStatus is the HTTP status answering a Revoke error.
func revokeStatus(err error) int {
	switch {
	case errors.Is(err, ErrInvalidRequest), errors.Is(err, ErrInvalidID):
		return http.StatusBadRequest
	case errors.Is(err, ErrUnknownSerial):
		return http.StatusNotFound
	case errors.Is(err, ErrNotLineageHead):
		return http.StatusConflict
	case errors.Is(err, ErrServerClosed):
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

// handleAdminRevoke is the admin socket's POST /revoke (adminOnly has admitted the
// caller).
func (s *Server) handleAdminRevoke(w http.ResponseWriter, r *http.Request) {
	actor := adminActor(r)
	var req meshapi.RevokeRequest
	if err := meshapi.DecodeStrict(http.MaxBytesReader(w, r.Body, adminMaxBody), &req); err != nil {
		msg := "invalid request body: " + err.Error()
		s.audit(refusedRevocation(actor, nil, msg))
		writeAdminError(w, http.StatusBadRequest, msg)
		return
	}
	// The revocation completes even if the caller goes away meanwhile.
	res, err := s.Revoke(context.WithoutCancel(r.Context()), actor, req)
	if err != nil {
		writeAdminError(w, revokeStatus(err), err.Error()) // logged and audited by Revoke
		return
	}
	writeJSON(w, res)
}

// mayRevoke is the mesh API's authorisation of a revocation: an operator (/admin/*)
// may revoke anything; any other workload only a certificate (by serial) issued to
// its own identity, owner being the SPIFFE ID of that serial's certificate (zero when
// the serial is unknown). That is how a proxy that rotated away from a compromised
// key revokes the old certificate with its new one; revoking a whole identity, its
// own included, stays with operators.
func mayRevoke(caller spiffeid.ID, t revokeTarget, owner spiffeid.ID) bool {
	if isAdminID(caller) {
		return true
	}
	return t.serial != "" && !owner.IsZero() && owner == caller
}

// serialOwner is the SPIFFE ID of the certificate with this serial, zero when it was
// never issued here or is not an SVID.
func (s *Server) serialOwner(serial string) (spiffeid.ID, error) {
	cert, err := s.db.GetCertificate(serial)
	if database.IsErrNotFound(err) {
		return spiffeid.ID{}, nil
	}
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("ca: revoke: read certificate %s: %w", serial, err)
	}
	id, err := x509svid.IDFromCert(cert)
	if err != nil {
		return spiffeid.ID{}, nil
	}
	return id, nil
}

// handleMeshRevoke is POST /mesh/v1/revoke: operators (/admin/* SVIDs) revoke
// anything, other SVIDs only serials of their own identity (see mayRevoke).
func (s *Server) handleMeshRevoke(w http.ResponseWriter, r *http.Request) {
	id := callerID(r)
	actor := audit.TLSActor(r.TLS)
	if s.db.rev.revoked(id, callerSerial(r), callerNotBefore(r)) {
		msg := fmt.Errorf("%w: %s serial %s", ErrRevoked, id, callerSerial(r)).Error()
		s.audit(refusedRevocation(actor, nil, msg))
		s.refuse(w, r, http.StatusForbidden, id, msg)
		return
	}
	var req meshapi.RevokeRequest
	if err := meshapi.DecodeStrict(http.MaxBytesReader(w, r.Body, maxRevokeBody), &req); err != nil {
		msg := "invalid request body: " + err.Error()
		s.audit(refusedRevocation(actor, nil, msg))
		s.refuse(w, r, http.StatusBadRequest, id, msg)
		return
	}
	if !isAdminID(id) {
		// The request is validated first so that a malformed one is a 400 whoever
		// sends it; the owner is looked up only for a well-formed serial.
		t, err := parseRevokeRequest(s.cfg.TrustDomain, req)
		if err != nil {
			s.audit(refusedRevocation(actor, &req, err.Error()))
			s.refuse(w, r, revokeStatus(err), id, err.Error())
			return
		}
		var owner spiffeid.ID
		if t.serial != "" {
			if owner, err = s.serialOwner(t.serial); err != nil {
				s.log.Error("revocation authorisation failed", keyInitiator, actor.Initiator, keySerial, t.serial, keyErr, err)
				writeStepError(w, http.StatusInternalServerError, "read certificate")
				return
			}
		}
		if !mayRevoke(id, t, owner) && !mayRevokeLineage(id, callerSerial(r), t) {
			// An unknown serial is refused like another identity's: only operators
			// learn which serials exist.
			msg := "only " + meshapi.AdminPathPrefix + "* identities may revoke, other than a serial of the caller's own identity " +
				"or its lineage except the presented certificate"
			s.audit(refusedRevocation(actor, &req, msg))
			s.refuse(w, r, http.StatusForbidden, id, msg)
			return
		}
	}
	res, err := s.Revoke(context.WithoutCancel(r.Context()), actor, req)
	if err != nil {
		writeStepError(w, revokeStatus(err), err.Error()) // logged and audited by Revoke
		return
	}
	writeJSON(w, res)
}

// handleRevocations is GET /mesh/v1/revocations: the signed deny-list in force, to
// any SVID of the trust domain, revoked ones included (a revoked proxy learns it).
func (s *Server) handleRevocations(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(s.deny.Load().encoded)
}

// RequestRevoke asks the CA running with state directory stateDir, through its admin
// socket, to revoke (what `agentmesh revoke --state DIR` runs); see Server.Revoke. The
// caller must be root or the CA's user. A refusal is a *ResponseError with Op
// "revoke": 400 for a bad request, 403 for a caller not allowed, 404 for an unknown
// serial.
func RequestRevoke(ctx context.Context, stateDir string, req meshapi.RevokeRequest) (*meshapi.RevokeResult, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("ca: revoke: %w", err)
	}
	b, err := adminRequest(ctx, stateDir, "revoke", http.MethodPost, adminRevokePath, body, meshapi.MaxResponse)
	if err != nil {
		return nil, err
	}
	return meshapi.DecodeRevokeResult(b)
}
