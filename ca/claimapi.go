package ca

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/agentmesh/agentmesh/meshapi"
	"log/slog"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
)

// adminHostsPath is the admin socket's address claims: POST sets a host's, DELETE
// ?id= removes it, GET lists them.
const adminHostsPath = "/hosts"

// SetHostClaim makes prefixes the addresses the proxy of host may claim (an operator's
// claim, replacing a learnt one or an earlier one), for actor (audit.PeerUIDActor on the admin
// socket). It is written to StateDir/claims.json before it takes effect; a live
// directory entry of host advertising an address outside it is removed at once. Errors
// wrap ErrInvalidRequest (host is not a /host/NAME ID of the CA's trust domain, no or
// more than 32 prefixes, a malformed prefix), ErrClaimConflict (a prefix overlaps
// another host's claim) or ErrServerClosed. Every call is audited
// (audit.AddressClaim), a refusal also counted.
func (s *Server) SetHostClaim(ctx context.Context, actor audit.Actor, host spiffeid.ID, prefixes []netip.Prefix) (meshapi.HostClaim, error) {
	c, err := checkHostClaim(s.cfg.TrustDomain, meshapi.HostClaim{Host: host, Prefixes: prefixes, Source: meshapi.ClaimAdmin, At: time.Now().UTC().Round(0)})
	rec := claimRecord(actor, claimActionRegister, host, c, netip.Addr{})
	if err == nil {
		err = s.changeClaims(func(cur *claimSet) (*claimSet, error) { return cur.with(c) })
	}
	if err != nil {
		s.claimRefused(ctx, rec, err)
		return meshapi.HostClaim{}, err
	}
	s.dir.dropOutside(c)
	s.audit(rec)
	s.log.LogAttrs(ctx, slog.LevelInfo, "address claim registered", slog.String(keyInitiator, actor.Initiator),
		slog.String(keyHost, host.String()), slog.Any(keyPrefixes, rec.Allowed))
	return c, nil
}

// RemoveHostClaim removes host's claim and returns it, for actor: the host's next
// registration learns a claim again (see docs/directory.md). Its live directory entry
// stays. Errors wrap ErrEntryNotFound (no claim) or ErrServerClosed. Audited like
// SetHostClaim.
func (s *Server) RemoveHostClaim(ctx context.Context, actor audit.Actor, host spiffeid.ID) (meshapi.HostClaim, error) {
	var old meshapi.HostClaim
	err := s.changeClaims(func(cur *claimSet) (*claimSet, error) {
		next, removed, err := cur.without(host)
		old = removed
		return next, err
	})
	rec := claimRecord(actor, claimActionUnregister, host, old, netip.Addr{})
	if err != nil {
		s.claimRefused(ctx, rec, err)
		return meshapi.HostClaim{}, err
	}
	s.audit(rec)
	s.log.LogAttrs(ctx, slog.LevelInfo, "address claim unregistered", slog.String(keyInitiator, actor.Initiator),
		slog.String(keyHost, host.String()))
	return old, nil
}

// HostClaims returns the address claims in force, sorted by host (a copy).
func (s *Server) HostClaims() []meshapi.HostClaim { return slices.Clone(s.claims.Load().sorted) }

// changeClaims applies change to the claims in force and persists the result, under
// claimsMu: no registration is checked against a claim set that is being replaced.
func (s *Server) changeClaims(change func(*claimSet) (*claimSet, error)) error {
	s.mu.Lock()
	state := s.state
	s.mu.Unlock()
	if state == stateClosed {
		return ErrServerClosed
	}
	s.claims.mu.Lock()
	defer s.claims.mu.Unlock()
	next, err := change(s.claims.Load())
	if err != nil {
		return err
	}
	return s.storeClaims(next)
}

// claimStatus is the HTTP status answering a claim error; 0 when err is none.
func claimStatus(err error) int {
	var ce *claimError
	switch {
	case !errors.As(err, &ce):
		return 0
	case errors.Is(err, ErrClaimConflict):
		return http.StatusConflict
	case errors.Is(err, ErrClaimNotAllowed):
		return http.StatusForbidden
	}
	return entryStatus(err) // 400 invalid, 404 no claim
}

// handleAdminSetHost is the admin socket's POST /hosts.
func (s *Server) handleAdminSetHost(w http.ResponseWriter, r *http.Request) {
	actor := adminActor(r)
	ctx := context.WithoutCancel(r.Context()) // the change completes if the caller goes away
	var req meshapi.HostClaimRequest
	err := meshapi.DecodeStrict(http.MaxBytesReader(w, r.Body, adminMaxBody), &req)
	if err != nil {
		err = invalidClaim("invalid request body: %v", err)
	}
	var prefixes []netip.Prefix
	for _, a := range req.Addresses {
		if err != nil {
			break
		}
		var p netip.Prefix
		p, err = ParseClaimPrefix(a)
		prefixes = append(prefixes, p)
	}
	if err != nil {
		s.claimRefused(ctx, claimRecord(actor, claimActionRegister, req.Host, meshapi.HostClaim{}, netip.Addr{}), err)
		writeAdminError(w, http.StatusBadRequest, err.Error())
		return
	}
	c, err := s.SetHostClaim(ctx, actor, req.Host, prefixes)
	if err != nil {
		writeAdminError(w, cmp.Or(claimStatus(err), http.StatusServiceUnavailable), err.Error()) // logged and audited
		return
	}
	writeJSON(w, c)
}

// handleAdminRemoveHost is the admin socket's DELETE /hosts?id=HOST.
func (s *Server) handleAdminRemoveHost(w http.ResponseWriter, r *http.Request) {
	actor := adminActor(r)
	ctx := context.WithoutCancel(r.Context())
	raw := r.URL.Query().Get("id")
	host, err := spiffeid.FromString(raw)
	if err != nil {
		err = invalidClaim("id %q: %v", raw, err)
		rec := claimRecord(actor, claimActionUnregister, spiffeid.ID{}, meshapi.HostClaim{}, netip.Addr{})
		rec.Host = raw
		s.claimRefused(ctx, rec, err)
		writeAdminError(w, http.StatusBadRequest, err.Error())
		return
	}
	old, err := s.RemoveHostClaim(ctx, actor, host)
	if err != nil {
		writeAdminError(w, cmp.Or(claimStatus(err), http.StatusServiceUnavailable), err.Error()) // logged and audited
		return
	}
	writeJSON(w, old)
}

// handleAdminHosts is the admin socket's GET /hosts.
func (s *Server) handleAdminHosts(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, meshapi.HostClaimsResponse{Hosts: s.HostClaims()})
}

// refusedClaimRecord is the audit record of an admin request on /hosts that adminOnly
// refused.
func refusedClaimRecord(r *http.Request, actor audit.Actor, msg string) audit.Event {
	action := claimActionRegister
	if r.Method == http.MethodDelete {
		action = claimActionUnregister
	}
	return audit.AddressClaim{Actor: actor, Action: string(action), Host: r.URL.Query().Get("id"),
		Result: string(claimRefused), Reason: string(reasonNotAdmin), Error: msg}
}

// RegisterHost sets the addresses the proxy of host may claim (each a CIDR prefix or
// one address, see ParseClaimPrefix) on the CA running with state directory stateDir,
// through its admin socket (what `agentmesh register HOST --addr CIDR` runs); see
// Server.SetHostClaim. A refusal is a *ResponseError with Op "register host": 400 for
// an invalid host or prefix, 403 for a caller not allowed, 409 for an overlap.
func RegisterHost(ctx context.Context, stateDir string, host spiffeid.ID, prefixes []netip.Prefix) (meshapi.HostClaim, error) {
	req := meshapi.HostClaimRequest{Host: host}
	for _, p := range prefixes {
		req.Addresses = append(req.Addresses, p.String())
	}
	body, err := json.Marshal(req)
	if err != nil {
		return meshapi.HostClaim{}, fmt.Errorf("ca: register host: %w", err)
	}
	return adminDecode[meshapi.HostClaim](ctx, stateDir, "register host", http.MethodPost, adminHostsPath, body, adminMaxBody)
}

// UnregisterHost removes host's address claim from the CA running with state directory
// stateDir (what `agentmesh unregister HOST` runs); see Server.RemoveHostClaim. A
// refusal is a *ResponseError with Op "unregister host": 403 for a caller not allowed,
// 404 when host has no claim.
func UnregisterHost(ctx context.Context, stateDir string, host spiffeid.ID) error {
	_, err := adminRequest(ctx, stateDir, "unregister host", http.MethodDelete,
		adminHostsPath+"?id="+url.QueryEscape(host.String()), nil, adminMaxBody)
	return err
}

// ListHosts returns the address claims of the CA running with state directory
// stateDir, sorted by host (what `agentmesh list` shows). A refusal is a
// *ResponseError with Op "list hosts".
func ListHosts(ctx context.Context, stateDir string) ([]meshapi.HostClaim, error) {
	ans, err := adminDecode[meshapi.HostClaimsResponse](ctx, stateDir, "list hosts", http.MethodGet, adminHostsPath, nil, maxEntriesResponse)
	return ans.Hosts, err
}

// adminDecode sends one request to the admin socket of stateDir (see adminRequest) and
// decodes its answer into a T.
func adminDecode[T any](ctx context.Context, stateDir, op, method, path string, body []byte, limit int64) (T, error) {
	var v T
	b, err := adminRequest(ctx, stateDir, op, method, path, body, limit)
	if err != nil {
		return v, err
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return v, fmt.Errorf("ca: %s: malformed answer from the admin socket: %w", op, err)
	}
	return v, nil
}
