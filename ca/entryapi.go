package ca

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/agentmesh/agentmesh/meshapi"
	"log/slog"
	"net/http"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
)

const (
	// adminEntriesPath is the admin socket's registration entries: POST registers,
	// DELETE ?id= unregisters, GET lists.
	adminEntriesPath = "/entries"
	// maxEntriesResponse bounds a list of entries a client reads: ~150 bytes an
	// entry.
	maxEntriesResponse = 16 << 20
)

// handleAdminRegister is the admin socket's POST /entries (adminOnly has admitted the
// caller).
func (s *Server) handleAdminRegister(w http.ResponseWriter, r *http.Request) {
	actor := adminActor(r)
	var req meshapi.EntryRequest
	err := meshapi.DecodeStrict(http.MaxBytesReader(w, r.Body, adminMaxBody), &req)
	if err == nil && req.UID == nil {
		err = errors.New("uid is required")
	}
	if err != nil {
		msg := "invalid request body: " + err.Error()
		s.audit(audit.Registration{Actor: actor, Action: actionRegister, Result: "refused", Error: msg})
		writeAdminError(w, http.StatusBadRequest, msg)
		return
	}
	e := meshapi.Entry{ID: req.ID, Host: req.Host, UID: *req.UID, Port: req.Port}
	// The change completes even if the caller goes away meanwhile.
	if err := s.RegisterEntry(context.WithoutCancel(r.Context()), actor, e); err != nil {
		writeAdminError(w, entryStatus(err), err.Error()) // logged and audited
		return
	}
	writeJSON(w, e)
}

// handleAdminUnregister is the admin socket's DELETE /entries?id=ID.
func (s *Server) handleAdminUnregister(w http.ResponseWriter, r *http.Request) {
	actor := adminActor(r)
	raw := r.URL.Query().Get("id")
	id, err := spiffeid.FromString(raw)
	if err != nil {
		msg := fmt.Sprintf("%v: id %q: %v", ErrInvalidRequest, raw, err)
		s.audit(audit.Registration{Actor: actor, Action: actionUnregister, SPIFFEID: raw, Result: "refused", Error: msg})
		writeAdminError(w, http.StatusBadRequest, msg)
		return
	}
	removed, err := s.UnregisterEntry(context.WithoutCancel(r.Context()), actor, id)
	if err != nil {
		writeAdminError(w, entryStatus(err), err.Error()) // logged and audited
		return
	}
	writeJSON(w, removed)
}

// handleAdminEntries is the admin socket's GET /entries.
func (s *Server) handleAdminEntries(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, meshapi.EntriesResponse{Entries: s.Entries()})
}

// entryStatus is the HTTP status answering a RegisterEntry or UnregisterEntry error.
func entryStatus(err error) int {
	switch {
	case errors.Is(err, ErrInvalidRequest):
		return http.StatusBadRequest
	case errors.Is(err, ErrEntryConflict):
		return http.StatusConflict
	case errors.Is(err, ErrEntryNotFound):
		return http.StatusNotFound
	case errors.Is(err, ErrRevoked):
		return http.StatusForbidden
	case errors.Is(err, ErrServerClosed):
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

// refusedAdminRecord is the audit record of an admin request adminOnly refused, for
// the requests that are audited (nil for the others).
func refusedAdminRecord(r *http.Request, actor audit.Actor, msg string) audit.Event {
	switch {
	case r.URL.Path == adminTokenPath:
		return audit.Issuance{Action: audit.ActionToken, Actor: actor, Result: audit.IssueRefused,
			Reason: audit.ReasonNotAllowed, Error: msg}
	case r.URL.Path == adminRevokePath:
		return refusedRevocation(actor, nil, msg)
	case r.URL.Path == adminReinstatePath:
		return refusedReinstatement(actor, nil, msg)
	case r.URL.Path == adminEntriesPath && r.Method == http.MethodPost:
		return audit.Registration{Actor: actor, Action: actionRegister, Result: "refused", Error: msg}
	case r.URL.Path == adminEntriesPath && r.Method == http.MethodDelete:
		return audit.Registration{Actor: actor, Action: actionUnregister,
			SPIFFEID: r.URL.Query().Get("id"), Result: "refused", Error: msg}
	case r.URL.Path == adminHostsPath && r.Method != http.MethodGet:
		return refusedClaimRecord(r, actor, msg)
	}
	return refusedRotationRecord(r, actor, msg)
}

// handleAgentToken is POST /mesh/v1/agents/token: a bootstrap token for an agent,
// granted to the proxy of the host its entry names and to no one else. Every request
// is audited (audit.Issuance, action "token", with the caller's SPIFFE ID and serial).
func (s *Server) handleAgentToken(w http.ResponseWriter, r *http.Request) {
	caller := callerID(r)
	rec := audit.Issuance{Actor: audit.TLSActor(r.TLS), PeerAddr: r.RemoteAddr}
	refuse := func(status int, msg string) {
		reason := audit.ReasonNotAllowed
		if status == http.StatusBadRequest {
			reason = audit.ReasonBadRequest
		}
		s.refusedToken(rec, reason, msg)
		s.refuse(w, r, status, caller, msg)
	}
	if !meshapi.IsHostID(caller) {
		refuse(http.StatusForbidden, "only "+meshapi.HostPathPrefix+"* identities may request agent tokens")
		return
	}
	if serial := callerSerial(r); s.db.rev.revoked(caller, serial, callerNotBefore(r)) {
		refuse(http.StatusForbidden, fmt.Errorf("%w: %s serial %s", ErrRevoked, caller, serial).Error())
		return
	}
	var req meshapi.AgentTokenRequest
	if err := meshapi.DecodeStrict(http.MaxBytesReader(w, r.Body, adminMaxBody), &req); err != nil {
		refuse(http.StatusBadRequest, "invalid request body: "+err.Error())
		return
	}
	rec.SPIFFEID = req.ID
	id, err := spiffeid.FromString(req.ID)
	if err != nil {
		refuse(http.StatusBadRequest, fmt.Sprintf("id %q: %v", req.ID, err))
		return
	}
	e, ok := s.entries.Load().byID[id]
	if !ok {
		refuse(http.StatusForbidden, fmt.Sprintf("no registration entry for %s", id))
		return
	}
	rec.Host = e.Host.String()
	if e.Host != caller {
		refuse(http.StatusForbidden, fmt.Sprintf("%s is registered to %s, not %s", id, e.Host, caller))
		return
	}
	tok, err := s.issueToken(rec, id)
	switch {
	case errors.Is(err, ErrRevoked):
		s.refuse(w, r, http.StatusForbidden, caller, err.Error())
		return
	case err != nil:
		s.log.Error("agent token failed", keySPIFFEID, id.String(), keyHost, caller.String(), keyErr, err)
		writeStepError(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	// Remembered so that the certificate it enrols records this host (lineage.go).
	s.db.lin.grant(tok, caller, time.Now())
	s.log.LogAttrs(r.Context(), slog.LevelDebug, "agent token granted",
		slog.String(keySPIFFEID, id.String()), slog.String(keyHost, caller.String()))
	writeJSON(w, meshapi.TokenResponse{Token: tok})
}

// RegisterEntry registers e with the CA running with state directory stateDir, through
// its admin socket (what `agentmesh register` runs); see Server.RegisterEntry. The
// caller must be root or the CA's user. A refusal is a *ResponseError with Op
// "register entry" carrying the CA's message: 400 for an invalid entry, 403 for a
// caller not allowed or a revoked identity, 409 for a conflict.
func RegisterEntry(ctx context.Context, stateDir string, e meshapi.Entry) error {
	// As an entryRequest: Entry leaves uid 0 out, and the CA refuses an entry without one.
	body, err := json.Marshal(meshapi.EntryRequest{ID: e.ID, Host: e.Host, UID: &e.UID, Port: e.Port})
	if err != nil {
		return fmt.Errorf("ca: register entry: %w", err)
	}
	_, err = adminRequest(ctx, stateDir, "register entry", http.MethodPost, adminEntriesPath, body, adminMaxBody)
	return err
}

// UnregisterEntry removes the entry of id from the CA running with state directory
// stateDir, through its admin socket (what `agentmesh unregister` runs); see
// Server.UnregisterEntry. A refusal is a *ResponseError with Op "unregister entry":
// 403 for a caller not allowed, 404 when id has no entry.
func UnregisterEntry(ctx context.Context, stateDir string, id spiffeid.ID) error {
	_, err := adminRequest(ctx, stateDir, "unregister entry", http.MethodDelete,
		adminEntriesPath+"?id="+url.QueryEscape(id.String()), nil, adminMaxBody)
	return err
}

// ListEntries returns the registration entries of the CA running with state directory
// stateDir, sorted by ID, read through its admin socket (what `agentmesh list` runs). A
// refusal is a *ResponseError with Op "list entries".
func ListEntries(ctx context.Context, stateDir string) ([]meshapi.Entry, error) {
	b, err := adminRequest(ctx, stateDir, "list entries", http.MethodGet, adminEntriesPath, nil, maxEntriesResponse)
	if err != nil {
		return nil, err
	}
	var ans meshapi.EntriesResponse
	if err := json.Unmarshal(b, &ans); err != nil {
		return nil, fmt.Errorf("ca: list entries: malformed answer from the admin socket: %w", err)
	}
	return ans.Entries, nil
}
