package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/agentmesh/agentmesh/proxy"
	"github.com/agentmesh/agentmesh/rotator"
)

// proxyState is what the admin API asks the proxy: readiness for /readyz, ticket keys
// for /status.
type proxyState interface {
	Ready() error
	TicketKeys() []proxy.TicketKeyStatus
}

// StatusDocument is the admin API's /status answer.
type StatusDocument struct {
	// Ready and NotReady are /readyz's answer, computed the same way: ready once the host
	// and every agent the directory registers to it hold a valid SVID, the deny-list is
	// fresh and the audit log takes records; NotReady says why not.
	Ready      bool                    `json:"ready"`
	NotReady   string                  `json:"not_ready,omitempty"`
	Identities []rotator.Status        `json:"identities"`
	TicketKeys []proxy.TicketKeyStatus `json:"ticket_keys"`
}

// admin serves /metrics, /healthz, /readyz and /status on the admin port.
type admin struct {
	ln     net.Listener
	srv    *http.Server
	logger *slog.Logger
}

// newAdmin serves the admin port: ready is the readiness of the identities (the host's and
// every registered agent's), identities the state of every identity held (the host's
// first, then the agents').
func newAdmin(addr string, reg *prometheus.Registry, ready func() error, identities func() []rotator.Status,
	px proxyState, logger *slog.Logger) (*admin, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("admin listen: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = fmt.Fprintln(w, "ok") // a failed write is a client gone
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := proxyReadiness(ready, px); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = fmt.Fprintln(w, "ready") // a failed write is a client gone
	})
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		doc := StatusDocument{Ready: true, Identities: identities(), TicketKeys: px.TicketKeys()}
		if err := proxyReadiness(ready, px); err != nil {
			doc.Ready, doc.NotReady = false, err.Error()
		}
		_ = json.NewEncoder(w).Encode(doc)
	})
	return &admin{
		ln:     ln,
		logger: logger,
		srv: &http.Server{
			Handler:           mux,
			ReadHeaderTimeout: 5 * time.Second,
			ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelDebug),
		},
	}, nil
}

// proxyReadiness is /readyz's answer (nil: ready), which the heartbeat reports too: the
// identities' readiness and the proxy's.
func proxyReadiness(identities func() error, px proxyState) error {
	return errors.Join(identities(), px.Ready())
}

func (a *admin) Addr() net.Addr { return a.ln.Addr() }

// Run serves until ctx is done.
func (a *admin) Run(ctx context.Context) error {
	if err := serveUntil(ctx, a.srv, a.ln); err != nil {
		return fmt.Errorf("admin: %w", err)
	}
	return nil
}

// serveUntil serves ln until ctx is done, then shuts srv down, giving requests in
// progress two seconds.
func serveUntil(ctx context.Context, srv *http.Server, ln net.Listener) error {
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx) // past the grace period the listener is closed all the same
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
