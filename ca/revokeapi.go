package ca

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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
	return strings.HasPrefix(id.Path(), adminPathPrefix) && len(id.Path()) > len(adminPathPrefix)
}

// refusedRevocation is the audit record of a revocation request refused before it
// reached Revoke (caller not allowed, unreadable body).
func refusedRevocation(initiator string, req *RevokeRequest, msg string) audit.Revocation {
	rec := audit.Revocation{Initiator: initiator, Result: "refused", Error: msg}
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
	cred, _ := r.Context().Value(peerCredKey{}).(peerCred)
	initiator := uidInitiator(cred.uid)
	var req RevokeRequest
	if err := decodeStrict(http.MaxBytesReader(w, r.Body, adminMaxBody), &req); err != nil {
		msg := "invalid request body: " + err.Error()
		s.audit(refusedRevocation(initiator, nil, msg))
		writeAdminError(w, http.StatusBadRequest, msg)
		return
	}
	// The revocation completes even if the caller goes away meanwhile.
	res, err := s.Revoke(context.WithoutCancel(r.Context()), initiator, req)
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
	initiator := id.String()
	if s.db.rev.revoked(id, callerSerial(r), callerNotBefore(r)) {
		msg := fmt.Errorf("%w: %s serial %s", ErrRevoked, id, callerSerial(r)).Error()
		s.audit(refusedRevocation(initiator, nil, msg))
		s.refuse(w, r, http.StatusForbidden, id, msg)
		return
	}
	var req RevokeRequest
	if err := decodeStrict(http.MaxBytesReader(w, r.Body, maxRevokeBody), &req); err != nil {
		msg := "invalid request body: " + err.Error()
		s.audit(refusedRevocation(initiator, nil, msg))
		s.refuse(w, r, http.StatusBadRequest, id, msg)
		return
	}
	if !isAdminID(id) {
		// The request is validated first so that a malformed one is a 400 whoever
		// sends it; the owner is looked up only for a well-formed serial.
		t, err := parseRevokeRequest(s.cfg.TrustDomain, req)
		if err != nil {
			s.audit(refusedRevocation(initiator, &req, err.Error()))
			s.refuse(w, r, revokeStatus(err), id, err.Error())
			return
		}
		var owner spiffeid.ID
		if t.serial != "" {
			if owner, err = s.serialOwner(t.serial); err != nil {
				s.log.Error("revocation authorisation failed", keyInitiator, initiator, keySerial, t.serial, keyErr, err)
				writeStepError(w, http.StatusInternalServerError, "read certificate")
				return
			}
		}
		if !mayRevoke(id, t, owner) && !mayRevokeLineage(id, callerSerial(r), t) {
			// An unknown serial is refused like another identity's: only operators
			// learn which serials exist.
			msg := "only " + adminPathPrefix + "* identities may revoke, other than a serial of the caller's own identity " +
				"or its lineage except the presented certificate"
			s.audit(refusedRevocation(initiator, &req, msg))
			s.refuse(w, r, http.StatusForbidden, id, msg)
			return
		}
	}
	res, err := s.Revoke(context.WithoutCancel(r.Context()), initiator, req)
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
func RequestRevoke(ctx context.Context, stateDir string, req RevokeRequest) (*RevokeResult, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("ca: revoke: %w", err)
	}
	b, err := adminRequest(ctx, stateDir, "revoke", http.MethodPost, adminRevokePath, body, maxResponse)
	if err != nil {
		return nil, err
	}
	return decodeRevokeResult(b)
}

// RevokeRemote asks the CA at cfg.URL to revoke, over mTLS with cert (an SVID of the
// trust domain): POST /mesh/v1/revoke. An operator SVID (/admin/...) may revoke any
// identity or serial; any other SVID only a serial of its own identity, which is how a
// proxy revokes its previous certificate after rotating away from a compromised key
// (with its new SVID). cfg.Token is not used. A refusal is a *ResponseError with Op
// "revoke": 400 for a bad request, 401 for a certificate that is not a valid SVID, 403
// for a request the certificate may not make (or a revoked certificate), 404 for a
// serial unknown to the CA (operators only: others get 403).
func RevokeRemote(ctx context.Context, cfg ClientConfig, cert tls.Certificate, req RevokeRequest) (*RevokeResult, error) {
	answer, err := meshPost(ctx, cfg, cert, "revoke", meshRevokePath, req)
	if err != nil {
		return nil, err
	}
	return decodeRevokeResult(answer)
}

// meshPost sends req as JSON to the mesh API's path at cfg.URL over mTLS with cert
// and returns the answer of a 200; any other status is a *ResponseError with op.
func meshPost(ctx context.Context, cfg ClientConfig, cert tls.Certificate, op, path string, req any) ([]byte, error) {
	c, err := NewClient(cfg)
	if err != nil {
		return nil, err
	}
	body, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", op, err)
	}
	tr := c.transport(&cert, false)
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+meshPrefix+path, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", op, err)
	}
	hr.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Transport: tr}).Do(hr)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", op, err)
	}
	defer func() { _ = resp.Body.Close() }()
	answer, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return nil, fmt.Errorf("ca: %s: read answer: %w", op, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, &ResponseError{Op: op, Status: resp.StatusCode, Message: stepErrorMessage(answer)}
	}
	return answer, nil
}

func decodeRevokeResult(b []byte) (*RevokeResult, error) {
	var res RevokeResult
	if err := json.Unmarshal(b, &res); err != nil || res.ListVersion == 0 {
		return nil, errors.New("ca: revoke: malformed answer")
	}
	return &res, nil
}
