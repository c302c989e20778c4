package main

import (
	"context"
	"errors"
	"fmt"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/policy"
	"github.com/agentmesh/agentmesh/proxy"
	"github.com/agentmesh/agentmesh/rotator"
)

// defaultStaleness bounds the deny-list's age while no SVID is held to measure it by.
const defaultStaleness = time.Hour

// hostSVIDFile, in the state directory, keeps the host SVID's chain and the reference of
// its key across restarts (rotator.Config.StateFile).
const hostSVIDFile = "svid.json"

func newProxyCmd() *cobra.Command {
	var configPath string
	cmd := &cobra.Command{
		Use:   "proxy",
		Short: "Run the per-host mTLS proxy and its identity rotator",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := loadProxyConfig(configPath)
			if err != nil {
				return err
			}
			return runProxy(cmd.Context(), configPath, cfg)
		},
	}
	cmd.Flags().StringVar(&configPath, "config", "", "proxy configuration file (YAML)")
	_ = cmd.MarkFlagRequired("config")
	return cmd
}

func runProxy(ctx context.Context, configPath string, cfg *proxyConfig) error {
	level, _ := parseLevel(cfg.Log.Level) // validated with the config
	logger := newLogger(os.Stderr, level, cfg.Log.Format)
	if err := os.MkdirAll(cfg.State, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	bundle, err := x509bundle.Load(cfg.ID.TrustDomain(), cfg.CARoot)
	if err != nil {
		return fmt.Errorf("load ca.root %s: %w", cfg.CARoot, err)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	auditLog, err := audit.Open(audit.Config{Path: cfg.AuditPath, Registerer: reg, Logger: logger.With("component", "audit")})
	if err != nil {
		return err
	}
	// The CA clients carry the proxy's mark like its tunnels, so capture rules that
	// exclude the mark never redirect the proxy's renewals back to itself.
	var markControl func(network, address string, c syscall.RawConn) error
	if cfg.Mark != 0 {
		markControl = proxy.MarkControl(cfg.Mark)
	}
	client, err := meshclient.NewClient(meshclient.ClientConfig{
		URL:     cfg.CAURL,
		Roots:   bundle.X509Authorities(),
		Token:   tokenFromFile(cfg.TokenFile),
		Control: markControl,
		Logger:  logger.With("component", "ca_client"),
	})
	if err != nil {
		return err
	}
	keys, closeKeys, err := openKeyStore(ctx, cfg)
	if err != nil {
		return err
	}
	defer closeKeys()
	// The host identity outlives the process when its keys do: its chain is kept beside
	// them. Agents' identities need no such file: they enrol again through the host's.
	var svidFile string
	if _, ok := keys.(rotator.PersistentKeys); ok {
		svidFile = filepath.Join(cfg.State, hostSVIDFile)
	}
	var px *proxy.Proxy
	rot, err := rotator.New(rotator.Config{
		ID:        cfg.ID,
		Issuer:    client,
		Bundle:    bundle,
		Policy:    cfg.Rotation,
		Keys:      keys,
		StateFile: svidFile,
		// Called only from rot.Run, which starts after px is set.
		Drain:      func(ctx context.Context, serial string, grace time.Duration) int { return px.Drain(ctx, serial, grace) },
		Audit:      auditLog,
		Registerer: reg,
		Logger:     logger.With("component", "rotator"),
	})
	if err != nil {
		return err
	}
	authz, err := startPolicy(cfg.PolicyPath, auditLog)
	if err != nil {
		return err
	}
	// Set below; agent rotators start only once the watch runs.
	var watch *meshclient.Watch
	var tokens *meshclient.AgentTokens
	ag := newAgents(cfg.ID, cfg.Rotation, reg, func() *meshapi.DenyList { return watch.State().DenyList() }, logger.With("component", "agents"),
		func(id spiffeid.ID, areg prometheus.Registerer, pol policy.Rotation) (*rotator.Rotator, error) {
			ac, err := meshclient.NewClient(meshclient.ClientConfig{
				URL:     cfg.CAURL,
				Roots:   bundle.X509Authorities(),
				Token:   func(ctx context.Context) (string, error) { return tokens.AgentToken(ctx, id) },
				Control: markControl,
				Logger:  logger.With("component", "ca_client", "agent", id.String()),
			})
			if err != nil {
				return nil, err
			}
			return rotator.New(rotator.Config{
				ID:         id,
				Issuer:     enrolOnly{ac},
				Bundle:     bundle,
				Policy:     pol,
				Keys:       keys,
				Drain:      func(ctx context.Context, serial string, grace time.Duration) int { return px.Drain(ctx, serial, grace) },
				Audit:      auditLog,
				Registerer: areg,
				Logger:     logger.With("component", "rotator", "agent", id.String()),
			})
		})
	pcfg := proxy.Config{
		ID:                    cfg.ID,
		Agents:                ag,
		Unattested:            cfg.Unattested,
		Policy:                authz,
		Credentials:           rot,
		TunnelListen:          cfg.Tunnel,
		Outbound:              cfg.Outbound,
		Explicit:              cfg.Explicit,
		Strict:                cfg.Strict,
		Unknown:               cfg.Unknown,
		Mark:                  cfg.Mark,
		Routes:                cfg.Routes,
		Services:              cfg.Services,
		TicketKeyPeriod:       cfg.Rotation.TicketKeyPeriod,
		Transports:            cfg.Transports,
		DisableResumption:     cfg.NoResume,
		QUICKeyUpdateInterval: cfg.QUICKeys,
		MaxIntermediates:      cfg.MaxInter,
		StreamAudit:           cfg.StreamAudit,
		PoolMaxLifetime:       cfg.Pool.MaxLifetime,
		PoolMaxStreams:        cfg.Pool.MaxStreams,
		PoolIdleTimeout:       cfg.Pool.IdleTimeout,
		AuditAck:              cfg.AuditAck,
		MaxConnections:        cfg.Limits.MaxConnections,
		MaxHandshakes:         cfg.Limits.MaxHandshakesInFlight,
		RefusalInterval:       cfg.Limits.RefusalInterval,
		RefusalSources:        cfg.Limits.RefusalSources,
		Audit:                 auditLog,
		Registerer:            reg,
		Logger:                logger.With("component", "proxy"),
	}
	// The directory client runs on every proxy, registering only when it advertises
	// addresses: it carries the deny-list, which every proxy enforces.
	var rotate rotateFunc // set once px exists; the callbacks below run only after that
	dcfg := meshclient.Config{
		URL:          cfg.CAURL,
		Roots:        bundle.X509Authorities(),
		Certificate:  rot.TLSCertificate,
		Addresses:    cfg.Advertise,
		Transports:   cfg.Transports,
		Heartbeat:    cfg.Heartbeat,
		PollInterval: cfg.Poll,
		Control:      markControl,
		Audit:        auditLog,
		Registerer:   reg,
		Logger:       logger.With("component", "directory"),
		// Called only from dir.Run, which starts after px is set.
		OnEntries: ag.update,
		OnDenyList: func(l *meshapi.DenyList) int {
			rot.Revoke(l.Denies)
			ag.revoke(l.Denies)
			return px.SetDenyList(l)
		},
		OnFleetRotation: func(f meshapi.FleetRotation) {
			// Off the directory's goroutine: a rotation waits for the CA.
			go func() {
				req := rotator.RotateRequest{Trigger: rotator.TriggerFleet, Initiator: "ca", Reason: f.Reason}
				if _, err := rotate(ctx, req); err != nil {
					logger.Warn("fleet rotation failed", "fleet_rotation", f.ID, "err", err)
				}
			}()
		},
	}
	if len(cfg.Advertise) > 0 {
		if dcfg.TunnelPort, err = portOf(cfg.Tunnel); err != nil {
			return err
		}
		// The bundle is the CA's root file for now: its digest names its version,
		// which follows a reload of the file.
		dcfg.BundleVersion = rot.BundleVersion
	}
	if watch, err = meshclient.NewWatch(dcfg); err != nil {
		return err
	}
	if tokens, err = meshclient.NewAgentTokens(dcfg); err != nil {
		return err
	}
	var heartbeat *meshclient.Heartbeat
	if len(cfg.Advertise) > 0 {
		if heartbeat, err = meshclient.NewHeartbeat(dcfg); err != nil {
			return err
		}
		pcfg.Directory = directory{watch}
	}
	pcfg.Revocation = func() error { return watch.CheckFresh(staleness(cfg.Staleness, rot)) }
	px, err = proxy.New(pcfg)
	if err != nil {
		return err
	}
	identities := func() []rotator.Status { return append([]rotator.Status{rot.Status()}, ag.statuses()...) }
	ready := func() error { return errors.Join(rot.Ready(), ag.ready()) }
	adm, err := newAdmin(cfg.Admin, reg, ready, identities, px, logger.With("component", "admin"))
	if err != nil {
		return err
	}
	cc := meshclient.ClientConfig{URL: cfg.CAURL, Roots: bundle.X509Authorities(), Control: markControl}
	rotateLogger := logger.With("component", "rotate")
	// One identity by name (the control socket), or all of them: the host's first, then
	// every agent's (fleet commands and rotation policy changes).
	rotateOne := func(id spiffeid.ID) (rotateFunc, bool) {
		if id.IsZero() || id == cfg.ID {
			return rotateNow(rot, px, cc, rotateLogger), true
		}
		if r, ok := ag.lookup(id); ok {
			return rotateNow(r, px, cc, rotateLogger), true
		}
		return nil, false
	}
	rotate = func(ctx context.Context, req rotator.RotateRequest) (rotator.RotateResult, error) {
		res, err := rotateNow(rot, px, cc, rotateLogger)(ctx, req)
		errs := []error{err}
		for _, r := range ag.rotators() {
			_, err := rotateNow(r, px, cc, rotateLogger)(ctx, req)
			errs = append(errs, err)
		}
		return res, errors.Join(errs...)
	}
	ctl, err := newControl(cfg.State, rotateOne, logger.With("component", "control"))
	if err != nil {
		return err
	}
	logger.Info("proxy starting", "tunnel", px.TunnelAddr().String(), "admin", adm.Addr().String())

	// The audit log outlives everything that writes to it, so records of connections
	// closed during shutdown are still written.
	auditCtx, stopAudit := context.WithCancel(context.WithoutCancel(ctx))
	auditDone := make(chan error, 1)
	go func() { auditDone <- auditLog.Run(auditCtx) }()

	// Before any rotator makes a key: keys a crashed process left in the token, which no
	// stored SVID names, are destroyed and audited (cause orphan).
	if lk, ok := keys.(rotator.ListableKeys); ok {
		if _, err := rotator.DestroyOrphans(ctx, rotator.OrphanConfig{Keys: lk, StateFiles: []string{svidFile},
			Audit: auditLog, Logger: logger.With("component", "rotator")}); err != nil {
			logger.Error("orphan keys not destroyed", "err", err)
		}
	}

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return rot.Run(gctx) })
	g.Go(func() error { return px.Run(gctx) })
	g.Go(func() error { return adm.Run(gctx) })
	g.Go(func() error { return watch.Run(gctx) })
	if heartbeat != nil {
		g.Go(func() error { return heartbeat.Run(gctx) })
	}
	g.Go(func() error { return ctl.Run(gctx) })
	g.Go(func() error { return ag.Run(gctx) })
	g.Go(func() error {
		w := &watcher{path: configPath, cur: cfg, rot: rot, agents: ag, px: px, rotate: rotate, audit: auditLog,
			logger: logger.With("component", "config")}
		if authz != nil {
			w.policyVersion = 1
		}
		w.run(gctx)
		return nil
	})
	err = g.Wait()
	stopAudit()
	return errors.Join(err, <-auditDone)
}

// staleness is how old a confirmed deny-list may be before new handshakes are refused:
// the configured maximum, or else the lifetime of the current SVID (a credential revoked
// while the feed was out of reach has expired by then, since it cannot renew).
func staleness(configured time.Duration, rot *rotator.Rotator) time.Duration {
	if configured > 0 {
		return configured
	}
	svid, err := rot.GetX509SVID()
	if err != nil {
		return defaultStaleness
	}
	leaf := svid.Certificates[0]
	return leaf.NotAfter.Sub(leaf.NotBefore)
}

// directory adapts the mesh state the watch holds to the proxy's lookup interface.
type directory struct{ w *meshclient.Watch }

func (x directory) PeerFor(a netip.Addr) (proxy.Peer, bool) {
	st := x.w.State()
	id, tunnel, ok := st.PeerFor(a)
	return proxy.Peer{ID: id, Tunnel: tunnel, Transports: st.TransportsFor(a), Agents: st.AgentsAt(a)}, ok
}

func portOf(addr string) (uint16, error) {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return 0, fmt.Errorf("tunnel address %q: %w", addr, err)
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("tunnel address %q: the directory needs a fixed port", addr)
	}
	return uint16(n), nil
}

// tokenFromFile reads the bootstrap token when the rotator enrols, so an operator can
// drop a fresh token in place for a re-enrolment without restarting the proxy.
func tokenFromFile(path string) func(context.Context) (string, error) {
	return func(context.Context) (string, error) {
		if path == "" {
			return "", tokenError{errors.New("no ca.token_file configured for enrolment")}
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return "", tokenError{fmt.Errorf("read bootstrap token: %w", err)}
		}
		tok := strings.TrimSpace(string(b))
		if tok == "" {
			return "", tokenError{fmt.Errorf("bootstrap token file %s is empty", path)}
		}
		return tok, nil
	}
}

// tokenError is a bootstrap token that cannot be had. Retrying cannot help until an
// operator writes one, so it is permanent: the rotator then reports that a new token
// is needed (and still reads the file again at each retry).
type tokenError struct{ err error }

func (e tokenError) Error() string { return e.err.Error() }
func (e tokenError) Unwrap() error { return e.err }
func (tokenError) Permanent() bool { return true }
