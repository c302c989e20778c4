package ca

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/errgroup"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

// ProcessConfig configures the process `agentmesh ca` runs: a Server, the audit log it
// writes and the listener of its Prometheus metrics.
type ProcessConfig struct {
	// CA configures the Server. Run sets its Audit and Registerer, and its Logger to
	// Logger with component=ca when it is nil.
	CA Config

	// Logger is the process's logger. Default: discard.
	Logger *slog.Logger

	// AuditPath is the audit log of revocations, registrations and fleet rotations.
	// Default "": audit.log in CA.StateDir.
	AuditPath string
	// AuditLog tunes the audit log's checkpoints and segments. Default: the log's.
	AuditLog AuditLogSettings

	// MetricsAddr is the TCP address serving the CA's Prometheus metrics (with the Go
	// runtime's and the process's) at GET /metrics. Default "": not served.
	MetricsAddr string
}

// metricsShutdown bounds how long the metrics listener waits for requests in flight.
const metricsShutdown = 2 * time.Second

// Run runs the CA process until ctx is done: it creates the state directory, opens the
// audit log, starts the Server and, with MetricsAddr, the metrics listener, and returns
// once all of them have stopped. The audit log is closed last, so the records of the
// CA's last requests are written.
func Run(ctx context.Context, cfg ProcessConfig) error {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.CA.Logger == nil {
		cfg.CA.Logger = cfg.Logger.With("component", "ca")
	}
	if err := os.MkdirAll(cfg.CA.StateDir, 0o700); err != nil {
		return fmt.Errorf("ca: state directory: %w", err)
	}
	if cfg.AuditPath == "" {
		cfg.AuditPath = filepath.Join(cfg.CA.StateDir, "audit.log")
	}
	if err := cfg.AuditLog.validate(); err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	cfg.CA.Registerer = reg
	// The log signs its checkpoints with the CA's audit key, which New opens in the
	// token: so New opens the log, and the proxies witness it.
	var auditLog *audit.Log
	cfg.CA.OpenAuditLog = func(key crypto.Signer) (CheckpointLog, error) {
		l, err := audit.Open(cfg.AuditLog.apply(audit.Config{Path: cfg.AuditPath, Logger: cfg.Logger.With("component", "audit"),
			Registerer: reg, Origin: meshapi.CAAuditOrigin(cfg.CA.TrustDomain), Signer: key}))
		if err != nil {
			return nil, err
		}
		auditLog = l
		return l, nil
	}
	srv, err := New(ctx, cfg.CA)
	if auditLog == nil {
		return err
	}
	// From here on the log runs until everything that writes to it has stopped, and
	// is closed last, so the records of the CA's last requests are written.
	auditCtx, stopAudit := context.WithCancel(context.WithoutCancel(ctx))
	auditDone := make(chan error, 1)
	go func() { auditDone <- auditLog.Run(auditCtx) }()
	if err == nil {
		err = serve(ctx, cfg, reg, srv)
	}
	stopAudit()
	return errors.Join(err, <-auditDone)
}

// serve runs srv and the metrics listener under one errgroup.
func serve(ctx context.Context, cfg ProcessConfig, reg *prometheus.Registry, srv *Server) error {
	g, gctx := errgroup.WithContext(ctx)
	if cfg.MetricsAddr != "" {
		ln, err := net.Listen("tcp", cfg.MetricsAddr)
		if err != nil {
			_ = srv.Close()
			return fmt.Errorf("ca: metrics: %w", err)
		}
		serveMetrics(gctx, g, ln, reg, cfg.Logger)
	}
	cfg.Logger.Info("ca ready", "url", srv.URL(), "trust_domain", cfg.CA.TrustDomain.String(), "state", cfg.CA.StateDir)
	g.Go(func() error { return srv.Run(gctx) })
	return g.Wait()
}

// serveMetrics serves reg at GET /metrics on ln in g until ctx is done.
func serveMetrics(ctx context.Context, g *errgroup.Group, ln net.Listener, reg *prometheus.Registry, logger *slog.Logger) {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	ms := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second,
		ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelDebug)}
	g.Go(func() error {
		if err := ms.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("ca: metrics: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), metricsShutdown)
		defer cancel()
		return ms.Shutdown(sctx)
	})
}
