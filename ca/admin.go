package ca

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The admin API is HTTP over the unix socket StateDir/admin.sock (0600, in a 0700
// directory). Callers are authenticated by the kernel: SO_PEERCRED must name root or
// the CA's own user.
const (
	adminTokenPath     = "/token"
	adminMaxBody       = 4 << 10
	adminClientTimeout = 30 * time.Second
	// maxSocketPath is the longest unix socket path Linux accepts (sun_path is 108
	// bytes including the terminating NUL).
	maxSocketPath = 107
)

// tokenRequest is the body of POST /token.
type tokenRequest struct {
	SPIFFEID string `json:"spiffe_id"`
}

// tokenResponse is the answer to POST /token.
type tokenResponse struct {
	Token string `json:"token"`
}

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
	uid, err := peerUID(c)
	return context.WithValue(ctx, peerCredKey{}, peerCred{uid: uid, err: err})
}

// peerAllowed is the admin API's authorisation: root, or the user the CA runs as.
func peerAllowed(peerUID, selfUID int) bool {
	return peerUID == 0 || peerUID == selfUID
}

func (s *Server) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+adminTokenPath, s.handleToken)
	return mux
}

func (s *Server) handleToken(w http.ResponseWriter, r *http.Request) {
	cred, _ := r.Context().Value(peerCredKey{}).(peerCred)
	if cred.err != nil || !peerAllowed(cred.uid, os.Getuid()) {
		s.log.Warn("admin request refused", keyPath, r.URL.Path, keyPeerUID, cred.uid, keyErr, cred.err)
		writeAdminError(w, http.StatusForbidden, "caller is neither root nor the ca's user")
		return
	}
	var req tokenRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, adminMaxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeAdminError(w, http.StatusBadRequest, "invalid request body: "+err.Error())
		return
	}
	id, err := spiffeid.FromString(req.SPIFFEID)
	if err != nil {
		writeAdminError(w, http.StatusBadRequest, fmt.Sprintf("invalid spiffe_id %q: %v", req.SPIFFEID, err))
		return
	}
	tok, err := s.Token(id)
	switch {
	case errors.Is(err, ErrInvalidID):
		writeAdminError(w, http.StatusBadRequest, err.Error())
		return
	case err != nil:
		s.log.Error("bootstrap token failed", keySPIFFEID, id.String(), keyErr, err)
		writeAdminError(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	s.log.LogAttrs(r.Context(), slog.LevelDebug, "admin token request", slog.Int(keyPeerUID, cred.uid))
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_ = json.NewEncoder(w).Encode(tokenResponse{Token: tok})
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
	path := filepath.Join(stateDir, fileAdminSocket)
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: adminClientTimeout}

	body, err := json.Marshal(tokenRequest{SPIFFEID: id.String()})
	if err != nil {
		return "", fmt.Errorf("ca: token: %w", err)
	}
	// The host is a placeholder: the transport always dials the socket.
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://agentmesh-ca"+adminTokenPath, bytes.NewReader(body))
	if err != nil {
		return "", fmt.Errorf("ca: token: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return "", fmt.Errorf("ca: token: admin socket %s (is agentmesh ca running with this state directory?): %w", path, err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(io.LimitReader(resp.Body, adminMaxBody))
	if err != nil {
		return "", fmt.Errorf("ca: token: read answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		var ae adminError
		_ = json.Unmarshal(b, &ae)
		return "", &ResponseError{Op: "token", Status: resp.StatusCode, Message: ae.Error}
	}
	var ans tokenResponse
	if err := json.Unmarshal(b, &ans); err != nil || ans.Token == "" {
		return "", fmt.Errorf("ca: token: malformed answer from the admin socket")
	}
	return ans.Token, nil
}
