package ca

import (
	"errors"
	"fmt"
	"github.com/agentmesh/agentmesh/meshapi"
	"log/slog"
	"net/http"
	"slices"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// labelReason is the reason label of the CA's refusal metrics.
const labelReason = "reason"

// meshRoutes mounts the mesh API on r; the Server is its meshapi.Backend.
func (s *Server) meshRoutes(r chi.Router) { meshapi.Mount(r, meshBackend{s}) }

// meshBackend is the Server as the mesh API's meshapi.Backend.
type meshBackend struct{ *Server }

// VerifyCaller adds the SVID rules (exactly one SPIFFE ID in the trust domain, not a
// CA) to requireValidClientCert, which has already refused certificates that do not
// chain to the root for client authentication.
func (s meshBackend) VerifyCaller(r *http.Request) (spiffeid.ID, error) {
	// The client may leave out the intermediate; those of the CA's generations are
	// candidates.
	chain := append(slices.Clip(r.TLS.PeerCertificates), s.auth.Intermediates()...)
	id, _, err := x509svid.Verify(chain, s.auth.Bundle(), x509svid.WithTime(time.Now()))
	return id, err
}

func (s meshBackend) Refuse(w http.ResponseWriter, r *http.Request, status int, id spiffeid.ID, msg string) {
	s.refuse(w, r, status, id, msg)
}

func (s meshBackend) Register(w http.ResponseWriter, r *http.Request)    { s.handleRegister(w, r) }
func (s meshBackend) Watch(w http.ResponseWriter, r *http.Request)       { s.handleWatch(w, r) }
func (s meshBackend) Revoke(w http.ResponseWriter, r *http.Request)      { s.handleMeshRevoke(w, r) }
func (s meshBackend) Reinstate(w http.ResponseWriter, r *http.Request)   { s.handleMeshReinstate(w, r) }
func (s meshBackend) Revocations(w http.ResponseWriter, r *http.Request) { s.handleRevocations(w, r) }
func (s meshBackend) AgentToken(w http.ResponseWriter, r *http.Request)  { s.handleAgentToken(w, r) }
func (s meshBackend) AnchorAck(w http.ResponseWriter, r *http.Request)   { s.handleAnchorAck(w, r) }
func (s meshBackend) AuditCheckpoint(w http.ResponseWriter, r *http.Request) {
	s.handleAuditCheckpoint(w, r)
}

func callerID(r *http.Request) spiffeid.ID { return meshapi.Caller(r) }

// callerSerial is the serial of the client certificate requireSVID verified.
func callerSerial(r *http.Request) string {
	return r.TLS.PeerCertificates[0].SerialNumber.String()
}

// callerNotBefore is the NotBefore of the client certificate requireSVID verified.
func callerNotBefore(r *http.Request) time.Time {
	return r.TLS.PeerCertificates[0].NotBefore
}

// refuse answers a mesh API request with an error (step-ca's error format, like the
// rest of the HTTPS API) and logs it at Info.
func (s *Server) refuse(w http.ResponseWriter, r *http.Request, status int, id spiffeid.ID, msg string) {
	attrs := []slog.Attr{slog.String(keyPath, r.URL.Path), slog.Int(keyStatus, status), slog.String(keyErr, msg)}
	if !id.IsZero() {
		attrs = append(attrs, slog.String(keySPIFFEID, id.String()))
	}
	s.log.LogAttrs(r.Context(), slog.LevelInfo, "mesh request refused", attrs...)
	writeStepError(w, status, msg)
}

func (s *Server) handleRegister(w http.ResponseWriter, r *http.Request) {
	id := callerID(r)
	if !meshapi.IsHostID(id) {
		s.refuse(w, r, http.StatusForbidden, id, "only "+meshapi.HostPathPrefix+"* identities may register")
		return
	}
	var req meshapi.RegisterRequest
	if err := meshapi.DecodeStrict(http.MaxBytesReader(w, r.Body, meshapi.MaxRegisterBody), &req); err != nil {
		s.refuse(w, r, http.StatusBadRequest, id, "invalid request body: "+err.Error())
		return
	}
	parsed, err := meshapi.ParseRegistration(id, req)
	if err != nil {
		s.refuse(w, r, http.StatusBadRequest, id, err.Error())
		return
	}
	reg := registration{HostRegistration: parsed, Serial: callerSerial(r), NotBefore: callerNotBefore(r)}
	if s.db.rev.revoked(id, reg.Serial, reg.NotBefore) {
		s.refuse(w, r, http.StatusForbidden, id, fmt.Errorf("%w: %s serial %s", ErrRevoked, id, reg.Serial).Error())
		return
	}
	now := time.Now()
	version, err := s.registerClaimed(r.Context(), reg, remoteAddr(r), now)
	switch {
	case claimStatus(err) != 0:
		// Audited, counted and logged by registerClaimed: one host, its addresses.
		writeStepError(w, claimStatus(err), err.Error())
		return
	case errors.Is(err, ErrRevoked):
		// Logged at Warn by the registry, like a conflict.
		writeStepError(w, http.StatusForbidden, err.Error())
		return
	case errors.As(err, new(*conflictError)):
		// Logged at Warn by the registry: one address, one proxy.
		writeStepError(w, http.StatusConflict, err.Error())
		return
	case err != nil:
		// The claim learnt could not be persisted: logged and audited.
		writeStepError(w, http.StatusServiceUnavailable, "address claim not recorded")
		return
	}
	s.reportStatus(r, id, req.Status, now)
	writeJSON(w, meshapi.RegisterResponse{Version: version, Peer: meshapi.DirectoryEntry{
		SPIFFEID: reg.ID, Addresses: reg.Addresses, TunnelPort: reg.TunnelPort,
		Transports: reg.Transports, LastHeartbeat: now.Round(0), BundleVersion: reg.BundleVersion,
	}})
}

func (s *Server) handleWatch(w http.ResponseWriter, r *http.Request) {
	since, wait, err := meshapi.ParseWatchQuery(r.URL.Query().Get("since"), r.URL.Query().Get("wait"))
	if err != nil {
		s.refuse(w, r, http.StatusBadRequest, callerID(r), err.Error())
		return
	}
	id := callerID(r)
	release, refused, ok := s.watches.acquire(id)
	if !ok {
		s.refuseWatch(w, r, id, refused)
		return
	}
	defer release()
	// The server's read and write timeouts (30s) are shorter than the longest wait:
	// without moving both deadlines the connection would be cut mid-poll (and an
	// expired read deadline cancels the request context).
	deadline := time.Now().Add(wait + meshapi.WatchGrace)
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(deadline)
	_ = rc.SetWriteDeadline(deadline)
	body, err := s.dir.watch(r.Context(), id, since, wait)
	switch {
	case r.Context().Err() != nil:
		return // the client is gone
	case err != nil:
		s.log.Error("encode directory", keyErr, err)
		writeStepError(w, http.StatusInternalServerError, "encode directory")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(body) //nolint:gosec // G705: body is the JSON directory document the CA encoded, served as application/json
}

func writeJSON(w http.ResponseWriter, v any) { meshapi.WriteJSON(w, v) }
