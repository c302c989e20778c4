package ca

import (
	"context"
	"encoding/json"
	"fmt"
	"github.com/agentmesh/agentmesh/meshapi"
	"net/http"
	"strconv"

	"github.com/smallstep/certificates/api"

	"github.com/agentmesh/agentmesh/audit"
)

// step-ca's revocation routes (the step CLI posts to /revoke). They revoke in step-ca
// only, so agentmesh ca answers them itself: a revocation there lands on the mesh's
// deny-list like any other, or is refused with a message that names agentmesh revoke.
const (
	stepRevokePath   = "/revoke"
	stepRevokePath10 = "/1.0/revoke"
	// viaStepCA marks the audit record of a revocation asked through step-ca's API.
	viaStepCA = "step-ca"
	// maxStepRevokeBody bounds a step-ca revoke request body.
	maxStepRevokeBody = 16 << 10
)

// interceptStepRevoke hands step-ca's revocation routes to handleStepRevoke and
// everything else to next.
func (s *Server) interceptStepRevoke(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && (r.URL.Path == stepRevokePath || r.URL.Path == stepRevokePath10) {
			s.handleStepRevoke(w, r)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// handleStepRevoke is step-ca's POST /revoke and /1.0/revoke, as `step ca revoke
// --cert C --key K` sends it: the holder of a certificate (presented over mTLS and
// verified by requireValidClientCert) revokes that certificate. It is revoked like
// `agentmesh revoke --serial` (Server.Revoke: deny-list, step-ca, CRL), with the
// caller's SPIFFE ID as actor, and answered in step-ca's format. A revocation with
// a one-time token, without a client certificate or of another serial is refused (and
// audited) with a message that names agentmesh revoke: the only other holder of that
// authority is an operator.
func (s *Server) handleStepRevoke(w http.ResponseWriter, r *http.Request) {
	actor := audit.TLSActor(r.TLS)
	serial := actor.CallerSerial
	var body api.RevokeRequest
	err := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxStepRevokeBody)).Decode(&body)
	req := meshapi.RevokeRequest{Serial: body.Serial, Reason: body.Reason}
	if req.Reason == "" {
		req.Reason = "step ca revoke, reason code " + strconv.Itoa(body.ReasonCode)
	}
	refuse := func(status int, msg string) {
		msg += "; an operator revokes any certificate or identity with `agentmesh revoke`"
		rec := refusedRevocation(actor, &req, msg)
		rec.Via = viaStepCA
		s.audit(rec)
		s.log.Info("step-ca revocation refused", keyInitiator, actor.Initiator, keySerial, body.Serial, keyErr, msg)
		writeStepError(w, status, msg)
	}
	switch {
	case err != nil:
		refuse(http.StatusBadRequest, "invalid request body: "+err.Error())
		return
	case body.OTT != "":
		refuse(http.StatusForbidden, "revocation with a token is not served by agentmesh ca")
		return
	case serial == "":
		refuse(http.StatusUnauthorized, "present the certificate to revoke as the client certificate (step ca revoke --cert --key)")
		return
	case body.Serial != serial:
		refuse(http.StatusForbidden, fmt.Sprintf("serial %q is not the client certificate's (%s): only a certificate's holder revokes it here", body.Serial, serial))
		return
	}
	// The revocation completes even if the caller goes away meanwhile.
	if _, err := s.revokeVia(context.WithoutCancel(r.Context()), actor, viaStepCA, req); err != nil {
		writeStepError(w, revokeStatus(err), err.Error()) // logged and audited by revokeVia
		return
	}
	writeJSON(w, &api.RevokeResponse{Status: "ok"})
}
