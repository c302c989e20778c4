package node

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/audit/siem"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/policy"
	"github.com/agentmesh/agentmesh/proxy"
	"github.com/agentmesh/agentmesh/rotator"
)

// defaultStaleness bounds the deny-list's age while no SVID is held to measure it by.
const defaultStaleness = time.Hour

// node is the proxy process's components, built in dependency order by newNode. The
// callbacks the components are given (drain, denyList, newAgentRotator) are methods of
// node, and mesh states are applied by followMesh: they run only from the components'
// Run, which starts after every field is set.
type node struct {
	applier          // rot, agents, rotation: what mesh states and configuration changes apply to
	cfg      *Config // as loaded at start; the watcher keeps the one in force
	logger   *slog.Logger
	reg      *prometheus.Registry
	audit    *audit.Log
	auditKey crypto.Signer // signs the audit log's checkpoints and cosigns the CA's
	// auditWitness is the CA as the audit log's witness, made by buildMesh; caLog is
	// this proxy witnessing the CA's log in turn.
	auditWitness audit.Witness
	caLog        *caLog
	// auditVerifierKey is auditKey's verifier key, as the log's checkpoints name it;
	// witnessed is when the CA was last asked to witness (Unix ns).
	auditVerifierKey string
	witnessed        atomic.Int64
	bundle           *x509bundle.Bundle // the CA root file at start
	link             caLink
	keys             rotator.KeyStore
	svidFile         string // the host SVID's state file, "" when keys die with the process
	dir              meshDirectory
	authz            *policy.Authz // the policy file at start, nil without one
	px               *proxy.Proxy
	admin            *admin
	control          *control
	siem             *siem.Sink // nil without audit.siem
	version          string     // the build, as the heartbeat reports it
}

// Run runs the proxy process cfg describes until ctx is done: the audit log, the host's
// rotator, the agents' rotators, the mesh client, the proxy, the admin port, the control
// socket and the watcher of the configuration, policy and CA root files, under one
// errgroup. logger is the process's.
func Run(ctx context.Context, cfg *Config, logger *slog.Logger) error {
	n := &node{cfg: cfg, logger: logger}
	n.applier = applier{log: logger, fleetCtx: ctx, started: time.Now()}
	n.version = buildVersion(debug.ReadBuildInfo())
	closeKeys, err := n.build(ctx)
	if err != nil {
		return err
	}
	defer closeKeys()
	return n.run(ctx)
}

// build makes every component, in the order their dependencies need; it returns the
// key store's release.
func (n *node) build(ctx context.Context) (func(), error) {
	if err := os.MkdirAll(n.cfg.State, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	keys, uri, closeKeys, err := openKeyStore(ctx, n.cfg)
	if err != nil {
		return nil, err
	}
	// The audit key is in the same token as the SVID keys, and is needed first: the
	// audit log is the first component made.
	auditKey, closeAuditKey, err := openAuditKey(ctx, n.cfg.State, uri)
	if err != nil {
		closeKeys()
		return nil, err
	}
	release := func() { closeAuditKey(); closeKeys() }
	n.keys, n.auditKey = keys, auditKey
	for _, step := range []func() error{n.buildBase, n.buildHost, n.buildMesh, n.buildProxy, n.buildServers, n.buildSIEM} {
		if err := step(); err != nil {
			release()
			return nil, err
		}
	}
	return release, nil
}

// buildBase makes the trust bundle, the metrics registry, the audit log and the link
// to the CA.
func (n *node) buildBase() error {
	cfg := n.cfg
	var err error
	if n.bundle, err = x509bundle.Load(cfg.id.TrustDomain(), cfg.CA.Root); err != nil {
		return fmt.Errorf("load ca.root %s: %w", cfg.CA.Root, err)
	}
	n.reg = prometheus.NewRegistry()
	n.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	acfg := cfg.auditConfig(n.auditKey, witnessFunc(n.witness))
	if n.auditVerifierKey, err = auditVerifierKey(acfg.Origin, n.auditKey); err != nil {
		return err
	}
	acfg.Registerer, acfg.Logger = n.reg, n.component("audit")
	if n.audit, err = audit.Open(acfg); err != nil {
		return err
	}
	n.auditor = n.audit
	n.bundles.file = n.bundle.X509Authorities()
	n.link = newCALink(cfg.CA.URL, n.bundle.X509Authorities())
	n.caAnchors = n.link.anchors
	n.anchor = newAnchorFollower(n.reg)
	// The CA clients carry the proxy's mark like its tunnels, so capture rules that
	// exclude the mark never redirect the proxy's renewals back to itself.
	if cfg.Mark != 0 {
		n.link.control = proxy.MarkControl(cfg.Mark)
	}
	return nil
}

// buildHost makes the host identity's rotator and the agents' supervisor.
func (n *node) buildHost() error {
	issuer, err := n.link.issuer(tokenFromFile(n.cfg.CA.TokenFile), n.component("ca_client"))
	if err != nil {
		return err
	}
	// The host identity outlives the process when its keys do: its chain is kept beside
	// them. Agents' identities need no such file: they enrol again through the host's.
	if _, ok := n.keys.(rotator.PersistentKeys); ok {
		n.svidFile = filepath.Join(n.cfg.State, hostSVIDFile)
	}
	n.rot, err = rotator.New(rotator.Config{ID: n.cfg.id, Issuer: issuer, Bundle: n.bundle, Policy: n.cfg.Rotation,
		Keys: n.keys, StateFile: n.svidFile, Drain: n.drain, Audit: n.audit, Registerer: n.reg,
		OnRotate: n.onRotate, Logger: n.component("rotator")})
	if err != nil {
		return err
	}
	n.agents = newAgents(n.cfg.id, n.cfg.Rotation, n.reg, n.denyList, n.component("agents"), n.newAgentRotator)
	return nil
}

// buildMesh makes the mesh client. It runs on every proxy, registering only when it
// advertises addresses: it carries the deny-list, which every proxy enforces.
func (n *node) buildMesh() error {
	s := directorySettings{certificate: n.rot.TLSCertificate, addresses: n.cfg.advertise, transports: n.cfg.Transports,
		heartbeat: n.cfg.Directory.Heartbeat, poll: n.cfg.Revocation.Poll, audit: n.audit, registerer: n.reg,
		logger: n.component("directory")}
	if len(n.cfg.advertise) > 0 {
		var err error
		if s.tunnelPort, err = portOf(n.cfg.Tunnel); err != nil {
			return err
		}
		// The bundle in force (bundle.go: the roots the CA publishes, the root file's it
		// did not withdraw, and the anchors the SVIDs held still need): its digest names
		// its version, which follows every change of any.
		s.bundleVersion = n.rot.BundleVersion
		s.status = n.proxyStatus
	}
	var err error
	if n.dir, err = n.link.directory(s); err != nil {
		return err
	}
	if n.caLog, err = newCALog(filepath.Join(n.cfg.State, caAuditFile), meshapi.CAAuditOrigin(n.cfg.id.TrustDomain()),
		n.auditKey, n.audit, n.reg, n.component("audit")); err != nil {
		return err
	}
	if n.auditWitness, err = n.link.auditWitness(n.rot.TLSCertificate, n.caLog); err != nil {
		return err
	}
	// Every proxy acknowledges the steps of a rotation of the CA's anchors, advertising
	// or not: the CA counts those that follow the directory as members too.
	n.anchor.acker = n.dir
	n.heartbeat = n.dir
	return nil
}

// buildProxy loads the authorization policy and makes the proxy.
func (n *node) buildProxy() error {
	var err error
	if n.authz, err = startPolicy(n.cfg.Policy, n.audit); err != nil {
		return err
	}
	pcfg := n.cfg.proxyConfig()
	pcfg.Agents, pcfg.Policy, pcfg.Credentials = n.agents, n.authz, n.rot
	pcfg.Audit, pcfg.Registerer, pcfg.Logger = n.audit, n.reg, n.component("proxy")
	if len(n.cfg.advertise) > 0 {
		pcfg.Directory = n.dir
	}
	maxStale := n.cfg.Revocation.MaxStaleness
	pcfg.Revocation = func() error { return n.dir.CheckFresh(staleness(maxStale, n.rot)) }
	if n.px, err = proxy.New(pcfg); err != nil {
		return err
	}
	n.live = n.px
	n.px.SetDrainGrace(n.cfg.Rotation.WithDefaults().DrainGrace)
	n.rotation = rotation{tickets: n.px, revoker: n.link, logger: n.component("rotate")}
	return nil
}

// buildServers makes the admin port and the control socket.
func (n *node) buildServers() error {
	var err error
	n.admin, err = newAdmin(n.cfg.Admin, n.reg, n.ready, n.identities, n.px, n.component("admin"))
	if err != nil {
		return err
	}
	n.control, err = newControl(n.cfg.State, n.rotateOne, n.component("control"))
	return err
}

// proxyConfig is the part of proxy.Config the file sets.
func (c *Config) proxyConfig() proxy.Config {
	return proxy.Config{
		ID: c.id, Unattested: c.unattested, TunnelListen: c.Tunnel, Outbound: c.Outbound, Explicit: c.Explicit,
		Strict: c.Strict, Unknown: c.unknown, Mark: c.Mark, Routes: c.routes, Services: c.services,
		TicketKeyPeriod: c.Rotation.TicketKeyPeriod, Transports: c.Transports,
		DisableResumption: c.Resumption != nil && !*c.Resumption, QUICKeyUpdateInterval: c.QUICKeyUpdateInterval,
		MaxIntermediates: c.TLS.MaxIntermediates, StreamAudit: c.Audit.Streams,
		PoolMaxLifetime: c.Pool.MaxLifetime, PoolMaxStreams: c.Pool.MaxStreams, PoolIdleTimeout: c.Pool.IdleTimeout,
		AuditAck: c.Audit.Ack, MaxConnections: c.Limits.MaxConnections, MaxHandshakes: c.Limits.MaxHandshakesInFlight,
		RefusalInterval: c.Limits.RefusalInterval, RefusalSources: c.Limits.RefusalSources,
	}
}

// run starts every component under one errgroup and returns when they have all ended.
func (n *node) run(ctx context.Context) error {
	n.logger.Info("proxy starting", "tunnel", n.px.TunnelAddr().String(), "admin", n.admin.Addr().String())
	// The audit log outlives everything that writes to it, so records of connections
	// closed during shutdown are still written.
	auditCtx, stopAudit := context.WithCancel(context.WithoutCancel(ctx))
	auditDone := make(chan error, 1)
	go func() { auditDone <- n.audit.Run(auditCtx) }()
	n.destroyOrphans(ctx)

	w := newWatcher(n.cfg, &n.applier, n.component("config"))
	if n.authz != nil {
		w.policyVersion = 1
	}
	g, gctx := errgroup.WithContext(ctx)
	followMesh := func(ctx context.Context) error { return n.followMesh(ctx, n.dir) }
	for _, run := range []func(context.Context) error{n.rot.Run, n.px.Run, n.admin.Run, n.dir.Run, followMesh,
		n.control.Run, n.agents.Run, w.run, n.followAnchors, n.witnessIdle, n.runSIEM} {
		g.Go(func() error { return run(gctx) })
	}
	err := g.Wait()
	stopAudit()
	return errors.Join(err, <-auditDone)
}

// destroyOrphans runs before any rotator makes a key: keys a crashed process left in
// the token, which no stored SVID names, are destroyed and audited (cause orphan).
func (n *node) destroyOrphans(ctx context.Context) {
	lk, ok := n.keys.(rotator.ListableKeys)
	if !ok {
		return
	}
	if _, err := rotator.DestroyOrphans(ctx, rotator.OrphanConfig{Keys: lk, StateFiles: []string{n.svidFile},
		Audit: n.audit, Logger: n.component("rotator")}); err != nil {
		n.logger.Error("orphan keys not destroyed", "err", err)
	}
}

func (n *node) component(name string) *slog.Logger { return n.logger.With("component", name) }

// drain is every rotator's Drain: the proxy closes the connections of a credential.
func (n *node) drain(ctx context.Context, serial string, grace time.Duration) int {
	return n.px.Drain(ctx, serial, grace)
}

// denyList is the deny-list in force, for agents' rotators as they start.
func (n *node) denyList() proxy.Denier { return n.dir.DenyList() }

// newAgentRotator makes the rotator of a local agent: it enrols with tokens the CA
// grants this host while the agent is registered to it.
func (n *node) newAgentRotator(id spiffeid.ID, reg prometheus.Registerer, pol policy.RotationPolicy) (*rotator.Rotator, error) {
	issuer, err := n.link.agentIssuer(func(ctx context.Context) (string, error) { return n.dir.AgentToken(ctx, id) },
		n.logger.With("component", "ca_client", "agent", id.String()))
	if err != nil {
		return nil, err
	}
	// The bundle in force, which a root file or the mesh state may have changed since
	// the start: the host's rotator holds it.
	bundle, err := n.rot.GetX509BundleForTrustDomain(id.TrustDomain())
	if err != nil {
		return nil, err
	}
	return rotator.New(rotator.Config{ID: id, Issuer: issuer, Bundle: bundle, Policy: pol, Keys: n.keys,
		Drain: n.drain, Audit: n.audit, Registerer: reg, OnRotate: n.onRotate,
		Logger: n.logger.With("component", "rotator", "agent", id.String())})
}

// identities is the state of every identity held: the host's first, then the agents'.
func (a *applier) identities() []rotator.Status {
	return append([]rotator.Status{a.rot.Status()}, a.agents.statuses()...)
}

// ready is the readiness of the identities: the host's and every registered agent's.
func (a *applier) ready() error { return errors.Join(a.rot.Ready(), a.agents.ready()) }

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
