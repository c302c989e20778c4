package meshclient

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sync/atomic"

	"github.com/agentmesh/agentmesh/meshapi"
)

// Heartbeat keeps this proxy registered in the CA's mesh directory: it registers at
// once, then again every Config.Heartbeat, so that the CA keeps its entry alive and
// peers can reach it at Config.Addresses.
type Heartbeat struct {
	cfg     Config
	conn    *conn
	body    meshapi.RegisterRequest // the bundle version is per request
	running atomic.Bool
}

// NewHeartbeat checks cfg (Addresses and TunnelPort are required) and returns a
// Heartbeat. It does not contact the CA: call Run.
func NewHeartbeat(cfg Config) (*Heartbeat, error) {
	cfg = cfg.withDefaults()
	c, err := newConn(cfg)
	if err != nil {
		return nil, err
	}
	body, err := cfg.registerBody()
	switch {
	case err != nil:
		return nil, err
	case len(body.Addresses) == 0:
		return nil, fmt.Errorf("%w: Addresses are required to register", ErrInvalidConfig)
	}
	return &Heartbeat{cfg: cfg, conn: c, body: body}, nil
}

// Run registers at once and then every Config.Heartbeat (minus up to a tenth of
// jitter) until ctx is done. Failures (CA unreachable, refusal, bad answer) are
// logged at Warn and retried with capped exponential backoff and full jitter; they
// never end Run. It returns nil once ctx is done, or ErrRunning if Run is already
// running.
func (h *Heartbeat) Run(ctx context.Context) error {
	if !h.running.CompareAndSwap(false, true) {
		return ErrRunning
	}
	defer h.running.Store(false)
	defer h.conn.close()
	log := h.cfg.Logger
	registered := false
	for {
		failed := false
		version, err := retry(ctx, log, "directory registration failed", maxRetryBase, h.cfg.Heartbeat,
			func() (uint64, error) {
				v, err := h.Register(ctx)
				failed = failed || err != nil
				return v, err
			})
		if err != nil || ctx.Err() != nil {
			return nil
		}
		if failed || !registered {
			log.Info("registered in the mesh directory", keyAddresses, h.body.Addresses,
				keyTunnelPort, h.cfg.TunnelPort, keyVersion, version)
		}
		registered = true
		if !pause(ctx, h.cfg.Heartbeat, true) {
			return nil
		}
	}
}

// Register sends one registration (a heartbeat) and returns the directory version
// after it.
func (h *Heartbeat) Register(ctx context.Context) (uint64, error) {
	body := h.body
	if h.cfg.BundleVersion != nil {
		body.BundleVersion = h.cfg.BundleVersion()
	}
	b, err := json.Marshal(body)
	if err != nil {
		return 0, fmt.Errorf("ca: register: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, defaultTimeout)
	defer cancel()
	answer, err := h.conn.do(ctx, "register", http.MethodPost, meshapi.RegisterPath, b, meshapi.MaxRegisterBody)
	if err != nil {
		return 0, err
	}
	var resp meshapi.RegisterResponse
	if err := json.Unmarshal(answer, &resp); err != nil {
		return 0, fmt.Errorf("ca: register: malformed answer: %w", err)
	}
	return resp.Version, nil
}
