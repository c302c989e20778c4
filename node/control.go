package node

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/peercred"
	"github.com/agentmesh/agentmesh/rotator"
)

// The proxy's control socket, StateDir/control.sock (0600 in the 0700 state directory),
// takes the commands that change credentials; the TCP admin port only reads. Callers are
// authenticated by the kernel (SO_PEERCRED): root or the proxy's own user.
const ControlSocket = "control.sock"

// ControlRequest is the body of the control socket's POST /rotate.
type ControlRequest struct {
	// SPIFFEID names the identity to rotate; empty means the proxy's own.
	SPIFFEID    string `json:"spiffe_id,omitempty"`
	Reason      string `json:"reason"`
	Compromised bool   `json:"compromised,omitempty"`
}

// rotateFunc rotates an identity now for an initiator and reports what changed.
type rotateFunc func(ctx context.Context, req rotator.RotateRequest) (rotator.RotateResult, error)

type control struct {
	ln     *net.UnixListener
	srv    *http.Server
	logger *slog.Logger
}

type peerUIDKey struct{}

// newControl serves the control socket; find returns the rotation of an identity the
// proxy holds (the zero ID: its host's).
func newControl(stateDir string, find func(spiffeid.ID) (rotateFunc, bool), logger *slog.Logger) (*control, error) {
	path := filepath.Join(stateDir, ControlSocket)
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("control socket %s exists and is not a socket", path)
		}
		// The state directory is ours alone (the audit log would refuse a second
		// proxy on it), so a socket left there is stale.
		_ = os.Remove(path)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		_ = ln.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /rotate", rotateHandler(find))
	c := &control{ln: ln, logger: logger}
	c.srv = &http.Server{
		Handler:           c.authorize(mux),
		ReadHeaderTimeout: 5 * time.Second,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
		ConnContext: func(ctx context.Context, conn net.Conn) context.Context {
			uid, err := peercred.UID(conn)
			if err != nil {
				uid = -1
			}
			return context.WithValue(ctx, peerUIDKey{}, uid)
		},
	}
	return c, nil
}

// rotateHandler serves POST /rotate: the identity named (the host's when none is)
// rotates now, initiated by the caller's uid.
func rotateHandler(find func(spiffeid.ID) (rotateFunc, bool)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		uid, _ := r.Context().Value(peerUIDKey{}).(int)
		var req ControlRequest
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4<<10))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			http.Error(w, "invalid request body: "+err.Error(), http.StatusBadRequest)
			return
		}
		var id spiffeid.ID
		if req.SPIFFEID != "" {
			var err error
			if id, err = spiffeid.FromString(req.SPIFFEID); err != nil {
				http.Error(w, "invalid spiffe_id: "+err.Error(), http.StatusBadRequest)
				return
			}
		}
		rotate, ok := find(id)
		if !ok {
			http.Error(w, "this proxy holds no identity "+req.SPIFFEID, http.StatusNotFound)
			return
		}
		trigger := rotator.TriggerOperator
		if req.Compromised {
			trigger = rotator.TriggerCompromise
		}
		res, err := rotate(r.Context(), rotator.RotateRequest{Trigger: trigger,
			Actor: audit.PeerUIDActor(uid), Reason: req.Reason, Compromised: req.Compromised})
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(res)
	}
}

// authorize admits root and the proxy's own user, and no one else.
func (c *control) authorize(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		uid, _ := r.Context().Value(peerUIDKey{}).(int)
		if uid < 0 || (uid != 0 && uid != os.Getuid()) {
			c.logger.Warn("control request refused", "path", r.URL.Path, "peer_uid", uid)
			http.Error(w, "caller is neither root nor the proxy's user", http.StatusForbidden)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// Run serves until ctx is done.
func (c *control) Run(ctx context.Context) error {
	if err := serveUntil(ctx, c.srv, c.ln); err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	return nil
}
