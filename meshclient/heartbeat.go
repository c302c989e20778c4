package meshclient

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/agentmesh/agentmesh/meshapi"
)

// kickDelay is the least time between two heartbeats, however often Kick is called: a
// burst of changes (a fleet rotation of every identity, a deny-list dropping several)
// costs the CA at most five registrations a second, and its fleet view still shows
// each change within a second.
const kickDelay = 200 * time.Millisecond

// Heartbeat keeps this proxy registered in the CA's mesh directory: it registers at
// once, then again every Config.Heartbeat, so that the CA keeps its entry alive and
// peers can reach it at Config.Addresses. Each registration carries Config.Status.
type Heartbeat struct {
	cfg     Config
	conn    *conn
	body    meshapi.RegisterRequest // the bundle version and status are per request
	kick    chan struct{}           // buffer of one: kicks coalesce
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
	return &Heartbeat{cfg: cfg, conn: c, body: body, kick: make(chan struct{}, 1)}, nil
}

// Kick asks Run for a heartbeat now (or kickDelay after the last one) instead of at
// the end of the interval, so the CA sees a change of Config.Status (a rotation, a
// revocation) at once. Kicks coalesce; a kick while a registration is being retried is
// served by that retry. It never blocks and is safe for concurrent use.
func (h *Heartbeat) Kick() {
	select {
	case h.kick <- struct{}{}:
	default:
	}
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
		if !h.wait(ctx) {
			return nil
		}
	}
}

// wait waits for the next heartbeat: the interval (minus up to a tenth of jitter), or
// a Kick, but at least kickDelay after the last one. It reports false once ctx is done.
func (h *Heartbeat) wait(ctx context.Context) bool {
	next := jittered(h.cfg.Heartbeat, rand.Float64()) //nolint:gosec // G404: jitter spreads heartbeats out; nothing secret
	return pause(ctx, min(kickDelay, next), false) && pauseUntil(ctx, next-kickDelay, h.kick)
}

// Register sends one registration (a heartbeat) and returns the directory version
// after it.
func (h *Heartbeat) Register(ctx context.Context) (uint64, error) {
	body := h.body
	if h.cfg.BundleVersion != nil {
		body.BundleVersion = h.cfg.BundleVersion()
	}
	if h.cfg.Status != nil {
		body.Status = h.cfg.Status()
	}
	b, err := encodeRegister(body)
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

// encodeRegister marshals body within meshapi.MaxRegisterBody, which the CA enforces:
// its status keeps at most meshapi.MaxProxyStatusIdentities identities, and the last
// ones are left out while the request is too large (the status as a whole when even
// none fit), so a proxy holding many identities still registers. body's status is
// copied, never changed.
func encodeRegister(body meshapi.RegisterRequest) ([]byte, error) {
	if st := body.Status; st != nil && len(st.Identities) > meshapi.MaxProxyStatusIdentities {
		trimmed := *st
		trimmed.Identities = st.Identities[:meshapi.MaxProxyStatusIdentities]
		body.Status = &trimmed
	}
	for {
		b, err := json.Marshal(body)
		if err != nil || len(b) <= meshapi.MaxRegisterBody || body.Status == nil {
			return b, err
		}
		trimmed := *body.Status
		if n := len(trimmed.Identities); n > 0 {
			// The share that fits if identities are alike, and at least one fewer.
			trimmed.Identities = trimmed.Identities[:min(n-1, n*meshapi.MaxRegisterBody/len(b))]
			body.Status = &trimmed
		} else {
			body.Status = nil
		}
	}
}
