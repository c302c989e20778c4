package ca

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// The mesh API, under /mesh/v1 on the HTTPS API. Every request must present an
// X509-SVID of the CA's trust domain; see docs/directory.md.
const (
	meshPrefix          = "/mesh/v1"
	meshRegisterPath    = "/register"
	meshDirectoryPath   = "/directory"
	meshRevokePath      = "/revoke"
	meshRevocationsPath = "/revocations"

	maxRegisterBody = 64 << 10
	// maxDirectoryResponse bounds a directory document a client reads: ~250 bytes an
	// entry, so room for tens of thousands of proxies.
	maxDirectoryResponse = 16 << 20
	defaultWatchWait     = 25 * time.Second
	maxWatchWait         = 60 * time.Second
	// watchGrace is added to a long-poll's wait for the server's write deadline and
	// the client's request timeout.
	watchGrace = 10 * time.Second

	maxAddresses     = 32
	maxTransports    = 8
	maxTransportLen  = 32
	maxBundleVersion = 128

	// hostPathPrefix is the path prefix of proxy (host) IDs, the only ones that may
	// register: an agent's SVID must not be able to claim a host's addresses.
	hostPathPrefix = "/host/"
	// adminPathPrefix is the path prefix of operator IDs, the only ones that may
	// revoke over the mesh API.
	adminPathPrefix = "/admin/"
)

// registerRequest is the body of POST /mesh/v1/register. The SPIFFE ID is not in it:
// it is the client certificate's.
type registerRequest struct {
	Addresses []string `json:"addresses"`
	// TunnelPort is an int so that 0 or 70000 get a message naming the range rather
	// than a decoding error.
	TunnelPort    int      `json:"tunnel_port"`
	Transports    []string `json:"transports"`
	BundleVersion string   `json:"bundle_version,omitempty"`
}

// registerResponse answers a registration: the entry as stored and the directory
// version after it.
type registerResponse struct {
	Version uint64         `json:"version"`
	Peer    DirectoryEntry `json:"peer"`
}

type callerIDKey struct{}

// meshRoutes mounts the mesh API on r.
func (s *Server) meshRoutes(r chi.Router) {
	r.Use(s.requireSVID)
	r.Post(meshRegisterPath, s.handleRegister)
	r.Get(meshDirectoryPath, s.handleWatch)
	r.Post(meshRevokePath, s.handleMeshRevoke)
	r.Post(meshReinstatePath, s.handleMeshReinstate)
	r.Get(meshRevocationsPath, s.handleRevocations)
	r.Post(meshAgentTokenPath, s.handleAgentToken)
}

// requireSVID admits only requests whose client certificate is a valid X509-SVID of
// the trust domain now (401 otherwise), and records its ID for the handlers.
// requireValidClientCert has already refused certificates that do not chain to the
// root for client authentication; this adds the SVID rules (exactly one SPIFFE ID in
// the trust domain, not a CA) and makes the certificate mandatory.
func (s *Server) requireSVID(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
			s.refuse(w, r, http.StatusUnauthorized, spiffeid.ID{}, "client certificate required")
			return
		}
		// The client may leave out the intermediate; the CA's own is a candidate.
		chain := append(slices.Clip(r.TLS.PeerCertificates), s.auth.Intermediate())
		id, _, err := x509svid.Verify(chain, s.auth.Bundle(), x509svid.WithTime(time.Now()))
		if err != nil {
			s.refuse(w, r, http.StatusUnauthorized, id, "client certificate is not a valid X509-SVID: "+err.Error())
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), callerIDKey{}, id)))
	})
}

func callerID(r *http.Request) spiffeid.ID {
	id, _ := r.Context().Value(callerIDKey{}).(spiffeid.ID)
	return id
}

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
	if !isHostID(id) {
		s.refuse(w, r, http.StatusForbidden, id, "only "+hostPathPrefix+"* identities may register")
		return
	}
	var req registerRequest
	if err := decodeStrict(http.MaxBytesReader(w, r.Body, maxRegisterBody), &req); err != nil {
		s.refuse(w, r, http.StatusBadRequest, id, "invalid request body: "+err.Error())
		return
	}
	reg, err := parseRegistration(id, req)
	if err != nil {
		s.refuse(w, r, http.StatusBadRequest, id, err.Error())
		return
	}
	reg.Serial, reg.NotBefore = callerSerial(r), callerNotBefore(r)
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
	writeJSON(w, registerResponse{Version: version, Peer: DirectoryEntry{
		SPIFFEID: reg.ID, Addresses: reg.Addresses, TunnelPort: reg.TunnelPort,
		Transports: reg.Transports, LastHeartbeat: now.Round(0), BundleVersion: reg.BundleVersion,
	}})
}

func (s *Server) handleWatch(w http.ResponseWriter, r *http.Request) {
	since, wait, err := parseWatchQuery(r.URL.Query().Get("since"), r.URL.Query().Get("wait"))
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
	deadline := time.Now().Add(wait + watchGrace)
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
	_, _ = w.Write(body)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_ = json.NewEncoder(w).Encode(v)
}

// isHostID reports whether id names a proxy: /host/<name>.
func isHostID(id spiffeid.ID) bool {
	return strings.HasPrefix(id.Path(), hostPathPrefix) && len(id.Path()) > len(hostPathPrefix)
}

// decodeStrict decodes exactly one JSON value with no unknown fields from r.
func decodeStrict(r io.Reader, v any) error {
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("trailing data after the JSON object")
	}
	return nil
}

// parseRegistration validates a register request for id and normalises it: addresses
// unmapped (::ffff:10.0.0.1 is 10.0.0.1, as peers look it up), sorted and unique;
// transports default to ["tls"] and are deduplicated in order.
func parseRegistration(id spiffeid.ID, req registerRequest) (registration, error) {
	reg := registration{ID: id, BundleVersion: req.BundleVersion}
	if len(req.Addresses) == 0 || len(req.Addresses) > maxAddresses {
		return reg, fmt.Errorf("addresses: need 1 to %d, got %d", maxAddresses, len(req.Addresses))
	}
	for _, s := range req.Addresses {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return reg, fmt.Errorf("addresses: %w", err)
		}
		if err := checkAdvertisable(a); err != nil {
			return reg, fmt.Errorf("addresses: %w", err)
		}
		reg.Addresses = append(reg.Addresses, a.Unmap())
	}
	slices.SortFunc(reg.Addresses, netip.Addr.Compare)
	reg.Addresses = slices.Compact(reg.Addresses)

	if req.TunnelPort < 1 || req.TunnelPort > 65535 {
		return reg, fmt.Errorf("tunnel_port %d is outside 1-65535", req.TunnelPort)
	}
	reg.TunnelPort = uint16(req.TunnelPort)

	transports, err := normaliseTransports(req.Transports)
	if err != nil {
		return reg, err
	}
	reg.Transports = transports

	if len(req.BundleVersion) > maxBundleVersion || !printable(req.BundleVersion) {
		return reg, fmt.Errorf("bundle_version: at most %d printable ASCII characters", maxBundleVersion)
	}
	return reg, nil
}

// checkAdvertisable refuses addresses no peer could dial: zoned (meaningful on one host
// only), unspecified, multicast.
func checkAdvertisable(a netip.Addr) error {
	switch {
	case a.Zone() != "":
		return fmt.Errorf("%s has a zone", a)
	case a.Unmap().IsUnspecified():
		return fmt.Errorf("%s is unspecified", a)
	case a.IsMulticast():
		return fmt.Errorf("%s is multicast", a)
	}
	return nil
}

// normaliseTransports checks transport names (lowercase letters, digits and '-',
// unknown ones allowed so that newer proxies can advertise them and older peers
// ignore them) and drops duplicates, keeping the order of preference.
func normaliseTransports(in []string) ([]string, error) {
	if len(in) == 0 {
		return []string{"tls"}, nil
	}
	if len(in) > maxTransports {
		return nil, fmt.Errorf("transports: at most %d", maxTransports)
	}
	out := make([]string, 0, len(in))
	for _, t := range in {
		if !validTransport(t) {
			return nil, fmt.Errorf("transports: %q is not a transport name", t)
		}
		if !slices.Contains(out, t) {
			out = append(out, t)
		}
	}
	return out, nil
}

func validTransport(t string) bool {
	if t == "" || len(t) > maxTransportLen {
		return false
	}
	for _, c := range t {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
			return false
		}
	}
	return true
}

func printable(s string) bool {
	for i := range len(s) {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// parseWatchQuery reads the long-poll parameters: since (a version, default 0) and
// wait (a Go duration such as "25s", default 25s, capped at 60s; 0 answers at once).
func parseWatchQuery(since, wait string) (uint64, time.Duration, error) {
	var v uint64
	if since != "" {
		var err error
		if v, err = strconv.ParseUint(since, 10, 64); err != nil {
			return 0, 0, fmt.Errorf("since %q is not a version", since)
		}
	}
	d := defaultWatchWait
	if wait != "" {
		var err error
		if d, err = time.ParseDuration(wait); err != nil || d < 0 {
			return 0, 0, fmt.Errorf("wait %q is not a non-negative duration such as 25s", wait)
		}
	}
	return v, min(d, maxWatchWait), nil
}
