package ca

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/agentmesh/agentmesh/meshapi"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/peercred"
	"github.com/agentmesh/agentmesh/internal/unixhttp"
)

// The admin API is HTTP over the unix socket StateDir/admin.sock (0600, in a 0700
// directory). Callers are authenticated by the kernel: SO_PEERCRED must name root or
// the CA's own user.
const (
	adminTokenPath     = "/token"
	adminDirectoryPath = "/directory"
	adminRevokePath    = "/revoke"
	adminRotatePath    = "/rotate"
	adminMaxBody       = 4 << 10
	adminClientTimeout = 30 * time.Second
	// maxSocketPath is the longest unix socket path Linux accepts (sun_path is 108
	// bytes including the terminating NUL).
	maxSocketPath = 107
)

// adminError is the body of an admin API error.
type adminError struct {
	Error string `json:"error"`
}

// listenAdmin binds the admin socket, replacing a stale one: the caller holds the state
// lock, so no other CA can be serving it.
func listenAdmin(path string) (*net.UnixListener, error) {
	if len(path) > maxSocketPath {
		return nil, fmt.Errorf("%w: admin socket path %s is %d bytes, the limit is %d: use a shorter StateDir",
			ErrInvalidConfig, path, len(path), maxSocketPath)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("admin socket %s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale admin socket: %w", err)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on admin socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("chmod admin socket: %w", err)
	}
	return ln, nil
}

type peerCredKey struct{}

// peerCred is who is on the other end of an admin connection.
type peerCred struct {
	uid int
	err error
}

// withPeerCred records the connection's SO_PEERCRED in its context (http.Server.ConnContext).
func withPeerCred(ctx context.Context, c net.Conn) context.Context {
	uid, err := peercred.UID(c)
	return context.WithValue(ctx, peerCredKey{}, peerCred{uid: uid, err: err})
}

// peerAllowed is the admin API's authorisation: root, or the user the CA runs as.
func peerAllowed(peerUID, selfUID int) bool {
	return peerUID == 0 || peerUID == selfUID
}

func (s *Server) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+adminTokenPath, s.adminOnly(s.handleToken))
	mux.HandleFunc("GET "+adminDirectoryPath, s.adminOnly(s.handleAdminDirectory))
	mux.HandleFunc("POST "+adminRevokePath, s.adminOnly(s.handleAdminRevoke))
	mux.HandleFunc("POST "+adminReinstatePath, s.adminOnly(s.handleAdminReinstate))
	mux.HandleFunc("POST "+adminRotatePath, s.adminOnly(s.handleAdminRotate))
	mux.HandleFunc("POST "+adminEntriesPath, s.adminOnly(s.handleAdminRegister))
	mux.HandleFunc("DELETE "+adminEntriesPath, s.adminOnly(s.handleAdminUnregister))
	mux.HandleFunc("GET "+adminEntriesPath, s.adminOnly(s.handleAdminEntries))
	mux.HandleFunc("POST "+adminHostsPath, s.adminOnly(s.handleAdminSetHost))
	mux.HandleFunc("DELETE "+adminHostsPath, s.adminOnly(s.handleAdminRemoveHost))
	mux.HandleFunc("GET "+adminHostsPath, s.adminOnly(s.handleAdminHosts))
	mux.HandleFunc("GET "+adminWitnessPath, s.adminOnly(s.handleAdminWitness))
	mux.HandleFunc("POST "+adminForgetPath, s.adminOnly(s.handleAdminForget))
	mux.HandleFunc("GET "+meshapi.AdminRotationPath, s.adminOnly(s.handleAdminRotationStatus))
	mux.HandleFunc("POST "+meshapi.AdminRotationPath, s.adminOnly(adminRotation(s.StartAnchorRotation)))
	mux.HandleFunc("POST "+meshapi.AdminRotationAbortPath, s.adminOnly(adminRotation(s.abortAnchorRotation)))
	mux.HandleFunc("POST "+meshapi.AdminRotationExcludePath, s.adminOnly(adminRotation(s.ExcludeFromAnchorRotation)))
	return mux
}

// adminOnly admits root and the CA's own user (SO_PEERCRED), and no one else. A
// refused revocation or registration entry request is audited too.
func (s *Server) adminOnly(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		cred, _ := r.Context().Value(peerCredKey{}).(peerCred)
		if cred.err != nil || !peerAllowed(cred.uid, os.Getuid()) {
			s.log.Warn("admin request refused", keyPath, r.URL.Path, keyPeerUID, cred.uid, keyErr, cred.err)
			const msg = "caller is neither root nor the ca's user"
			if rec := refusedAdminRecord(r, adminActor(r), msg); rec != nil {
				s.audit(rec)
			}
			writeAdminError(w, http.StatusForbidden, msg)
			return
		}
		next(w, r)
	}
}

// adminActor names the caller of an admin socket request in audit records: its uid.
func adminActor(r *http.Request) audit.Actor {
	cred, _ := r.Context().Value(peerCredKey{}).(peerCred)
	if cred.err != nil {
		return audit.PeerUIDActor(-1)
	}
	return audit.PeerUIDActor(cred.uid)
}

// handleAdminDirectory answers with the current mesh directory, at once.
func (s *Server) handleAdminDirectory(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, s.dir.snapshot(time.Now()))
}

func (s *Server) handleToken(w http.ResponseWriter, r *http.Request) {
	cred, _ := r.Context().Value(peerCredKey{}).(peerCred)
	rec := audit.Issuance{Actor: adminActor(r)}
	var req meshapi.TokenRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, adminMaxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		msg := "invalid request body: " + err.Error()
		s.refusedToken(rec, audit.ReasonBadRequest, msg)
		writeAdminError(w, http.StatusBadRequest, msg)
		return
	}
	id, err := spiffeid.FromString(req.SPIFFEID)
	if err != nil {
		msg := fmt.Sprintf("invalid spiffe_id %q: %v", req.SPIFFEID, err)
		s.refusedToken(rec, audit.ReasonBadRequest, msg)
		writeAdminError(w, http.StatusBadRequest, msg)
		return
	}
	tok, err := s.issueToken(rec, id)
	switch {
	case errors.Is(err, ErrInvalidID):
		writeAdminError(w, http.StatusBadRequest, err.Error())
		return
	case errors.Is(err, ErrRevoked):
		writeAdminError(w, http.StatusForbidden, err.Error())
		return
	case err != nil:
		s.log.Error("bootstrap token failed", keySPIFFEID, id.String(), keyErr, err)
		writeAdminError(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	s.log.LogAttrs(r.Context(), slog.LevelDebug, "admin token request", slog.Int(keyPeerUID, cred.uid))
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_ = json.NewEncoder(w).Encode(meshapi.TokenResponse{Token: tok})
}

func writeAdminError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(adminError{Error: msg})
}

// RequestToken asks the CA running with state directory stateDir, through its admin
// socket, for a one-time bootstrap token for id (what `agentmesh token --state DIR ID`
// runs). The caller must be root or the CA's user. A refusal is a *ResponseError with
// Op "token".
func RequestToken(ctx context.Context, stateDir string, id spiffeid.ID) (string, error) {
	body, err := json.Marshal(meshapi.TokenRequest{SPIFFEID: id.String()})
	if err != nil {
		return "", fmt.Errorf("ca: token: %w", err)
	}
	b, err := adminRequest(ctx, stateDir, "token", http.MethodPost, adminTokenPath, body, adminMaxBody)
	if err != nil {
		return "", err
	}
	var ans meshapi.TokenResponse
	if err := json.Unmarshal(b, &ans); err != nil || ans.Token == "" {
		return "", fmt.Errorf("ca: token: malformed answer from the admin socket")
	}
	return ans.Token, nil
}

// RequestDirectory returns the mesh directory of the CA running with state directory
// stateDir, read through its admin socket (what `agentmesh status` shows). The caller
// must be root or the CA's user. A refusal is a *ResponseError with Op "directory".
func RequestDirectory(ctx context.Context, stateDir string) (*meshapi.DirectoryDocument, error) {
	b, err := adminRequest(ctx, stateDir, "directory", http.MethodGet, adminDirectoryPath, nil, meshapi.MaxDirectoryResponse)
	if err != nil {
		return nil, err
	}
	var doc meshapi.DirectoryDocument
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("ca: directory: malformed answer from the admin socket: %w", err)
	}
	return &doc, nil
}

// adminRequest sends one request to the admin socket of stateDir and returns the
// answer's body (at most limit bytes) when it is a 200.
func adminRequest(ctx context.Context, stateDir, op, method, path string, body []byte, limit int64) ([]byte, error) {
	sock := filepath.Join(stateDir, fileAdminSocket)
	status, b, err := unixhttp.Do(ctx, unixhttp.Request{Socket: sock, Method: method, Path: path, Body: body,
		Limit: limit, Timeout: adminClientTimeout})
	if err != nil {
		return nil, fmt.Errorf("ca: %s: admin socket (is agentmesh ca running with this state directory?): %w", op, err)
	}
	if status != http.StatusOK {
		var ae adminError
		_ = json.Unmarshal(b, &ae)
		return nil, &meshapi.ResponseError{Op: op, Status: status, Message: ae.Error}
	}
	return b, nil
}
