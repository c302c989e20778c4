package main

import (
	"context"
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
	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/ca"
	"github.com/agentmesh/agentmesh/hsm"
)

func newCACmd() *cobra.Command {
	var (
		cfg         ca.Config
		trustDomain string
		logLevel    string
		logFormat   string
		auditPath   string
		metricsAddr string
	)
	cmd := &cobra.Command{
		Use:   "ca",
		Short: "Run the embedded step-ca with its keys in a PKCS#11 token",
		Long: `Run the agentmesh CA: step-ca embedded in-process, its root, intermediate and
provisioner keys generated inside a PKCS#11 token (a SoftHSM2 token in the state directory
unless --kms names another), serving step-ca's API with the CRL enabled. The first start
creates the token, keys, certificates and database in --state; later starts reuse them.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			td, err := spiffeid.TrustDomainFromString(trustDomain)
			if err != nil {
				return fmt.Errorf("--trust-domain: %w", err)
			}
			level, err := parseLevel(logLevel)
			if err != nil {
				return fmt.Errorf("--log-level: %w", err)
			}
			logger := newLogger(os.Stderr, level, logFormat)
			cfg.TrustDomain = td
			cfg.Logger = logger.With("component", "ca")
			if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
				return fmt.Errorf("state directory: %w", err)
			}
			if auditPath == "" {
				auditPath = filepath.Join(cfg.StateDir, "audit.log")
			}
			auditLog, err := audit.Open(audit.Config{Path: auditPath, Logger: logger.With("component", "audit")})
			if err != nil {
				return err
			}
			cfg.Audit = auditLog
			// The audit log outlives the CA, so the records of its last requests are written.
			auditCtx, stopAudit := context.WithCancel(context.WithoutCancel(cmd.Context()))
			auditDone := make(chan error, 1)
			go func() { auditDone <- auditLog.Run(auditCtx) }()
			reg := prometheus.NewRegistry()
			reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
			cfg.Registerer = reg
			err = runCA(cmd.Context(), cfg, logger, metricsAddr, reg)
			stopAudit()
			return errors.Join(err, <-auditDone)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.StateDir, "state", "", "state directory (token, certificates, database)")
	f.StringVar(&trustDomain, "trust-domain", "", "SPIFFE trust domain, e.g. example.org")
	f.StringVar(&cfg.Listen, "listen", ":9443", "address of the step-ca API")
	f.StringSliceVar(&cfg.DNSNames, "dns-name", nil, "names for the CA's TLS certificate (default: localhost, loopback addresses, the listen host, the hostname)")
	f.StringVar(&cfg.KMS, "kms", "", "PKCS#11 URI of the token holding the keys (default: a SoftHSM2 token in --state)")
	f.DurationVar(&cfg.SVIDLifetime, "svid-lifetime", time.Hour, "lifetime of issued X509-SVIDs (at least 10s)")
	f.DurationVar(&cfg.TokenLifetime, "token-lifetime", 5*time.Minute, "validity of bootstrap tokens")
	f.StringVar(&cfg.PINFile, "hsm-pin-file", hsm.CredentialPIN(), "PIN file of the SoftHSM2 token, outside --state (default: the systemd credential hsm.pin when passed, else STATE.pin beside the state directory)")
	f.IntVar(&cfg.MaxWatches, "max-watches", ca.DefaultMaxWatches, "concurrent directory long-polls one client identity may hold; more are answered 429")
	f.StringVar(&auditPath, "audit", "", "audit log of revocations (default: audit.log in --state)")
	f.StringVar(&metricsAddr, "metrics", "", "address serving the CA's Prometheus metrics at /metrics (default: none)")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&logFormat, "log-format", "text", "text or json")
	_ = cmd.MarkFlagRequired("state")
	_ = cmd.MarkFlagRequired("trust-domain")
	return cmd
}

func runCA(ctx context.Context, cfg ca.Config, logger *slog.Logger, metricsAddr string, reg *prometheus.Registry) error {
	srv, err := ca.New(ctx, cfg)
	if err != nil {
		return err
	}
	g, gctx := errgroup.WithContext(ctx)
	if metricsAddr != "" {
		ln, err := net.Listen("tcp", metricsAddr)
		if err != nil {
			_ = srv.Close()
			return fmt.Errorf("--metrics: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
		ms := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second,
			ErrorLog: slog.NewLogLogger(logger.Handler(), slog.LevelDebug)}
		g.Go(func() error {
			if err := ms.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("metrics: %w", err)
			}
			return nil
		})
		g.Go(func() error {
			<-gctx.Done()
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
			defer cancel()
			return ms.Shutdown(sctx)
		})
	}
	logger.Info("ca ready", "url", srv.URL(), "trust_domain", cfg.TrustDomain.String(), "state", cfg.StateDir)
	g.Go(func() error { return srv.Run(gctx) })
	return g.Wait()
}

func newTokenCmd() *cobra.Command {
	var state string
	cmd := &cobra.Command{
		Use:   "token SPIFFE-ID",
		Short: "Print a short-lived, one-time bootstrap token for exactly one identity",
		Long: `Ask the agentmesh CA running on this host (through the admin socket in its state
directory) for a one-time bootstrap token for SPIFFE-ID and print it. The token is
short-lived and can enrol exactly that identity once.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := argID("SPIFFE-ID", args[0])
			if err != nil {
				return err
			}
			tok, err := ca.RequestToken(cmd.Context(), state, id)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), tok)
			return err
		},
	}
	addStateFlag(cmd, &state)
	return cmd
}
