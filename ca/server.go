package ca

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/ca/authority"
	"github.com/agentmesh/agentmesh/internal/metricreg"
)

// shutdownTimeout bounds the graceful part of Run's shutdown; connections still open
// afterwards are closed.
const shutdownTimeout = 5 * time.Second

type serverState int

const (
	stateNew serverState = iota
	stateRunning
	stateClosed
)

// Server is an agentmesh CA: step-ca's authority with its keys in a PKCS#11 token,
// serving step-ca's API over HTTPS and the admin API on a unix socket. Addr, URL, Roots
// and Token are safe for concurrent use.
type Server struct {
	cfg Config
	log *slog.Logger

	lock    *os.File             // the state directory's lock
	auth    *authority.Authority // keys, certificates, tokens, step-ca and its HTTPS listener
	db      authDB               // step-ca's database with the revocation and lineage stores
	adminLn *net.UnixListener

	dir     *registry
	deny    denyStore
	fleet   fleetStore
	entries entryStore
	claims  claimStore
	anchor  anchorStore // the rotation of the trust anchors

	// The status page (statuspage*.go): what the proxies report of themselves, the
	// refusals counted, and the loopback listener (nil: none).
	status        *fleetStatus
	statusRefused *prometheus.CounterVec
	statusLn      net.Listener

	mu          sync.Mutex
	state       serverState // guarded by mu
	releaseOnce sync.Once

	watches *watchLimit // directory long-polls held per client identity

	// The witness of the audit logs (witness*.go).
	witness     *witnessStore
	wm          *witnessMetrics
	auditSigner witnessKey    // the CA's audit key: its checkpoints, its cosignatures
	caOrigin    string        // the origin of the CA's own audit log
	caLog       CheckpointLog // nil: the CA's log has no checkpoints to serve
}

// New prepares a CA in cfg.StateDir without serving it.
//
// On first start it creates the state directory, a SoftHSM2 token (unless cfg.KMS names
// one) with a random PIN in StateDir/hsm.pin, generates the root, intermediate and
// provisioner keys inside the token, self-signs the root (URI SAN spiffe://TD, name
// constraints permitting URIs in TD only), signs the intermediate with the root key,
// writes StateDir/root.crt and StateDir/intermediate.crt atomically and creates the
// database. Later starts reuse all of it and fail with ErrTrustDomainMismatch when the
// stored root belongs to another trust domain.
//
// New sets SOFTHSM2_CONF in the process environment for the embedded token, before the
// PKCS#11 module initialises: SoftHSM reads its configuration only from that variable,
// only in C_Initialize, and the system default needs root or the softhsm group. Hence one
// process serves one embedded SoftHSM state directory at a time (ErrSoftHSMInUse).
//
// New binds the HTTPS listener (cfg.Listen; port 0 picks a free port) and the admin
// socket StateDir/admin.sock (0600) but starts no goroutines. Call Run to serve, or
// Close to release everything.
func New(ctx context.Context, cfg Config) (_ *Server, err error) {
	started := time.Now()
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: cfg.Logger, status: newFleetStatus(), statusRefused: newStatusRefused()}
	s.deny.wake = make(chan struct{}, 1)
	defer func() {
		if err != nil {
			_ = s.release()
			err = boundary(err)
		}
	}()

	if err := prepareStateDir(cfg.StateDir, s.log); err != nil {
		return nil, err
	}
	if s.lock, err = lockStateDir(cfg.StateDir); err != nil {
		return nil, err
	}

	if s.auth, err = authority.Open(ctx, authority.Config{
		TrustDomain:   cfg.TrustDomain,
		StateDir:      cfg.StateDir,
		KMS:           cfg.KMS,
		PINFile:       cfg.PINFile,
		SVIDLifetime:  cfg.SVIDLifetime,
		Backdate:      backdate(cfg.SVIDLifetime),
		TokenLifetime: cfg.TokenLifetime,
		Logger:        s.log,
		Audit:         s.audit,
	}); err != nil {
		return nil, err
	}
	s.claims.metrics = newClaimMetrics()
	if err := s.initWitness(); err != nil {
		return nil, err
	}
	if s.db, err = openDB(cfg.StateDir, s.auth, &s.entries.Pointer, s.lineageRefused); err != nil {
		return nil, err
	}
	s.db.rev.backdate = backdate(cfg.SVIDLifetime)

	if err := s.auth.Listen(ctx, cfg.Listen, cfg.DNSNames); err != nil {
		return nil, err
	}
	if s.adminLn, err = listenAdmin(filepath.Join(cfg.StateDir, fileAdminSocket)); err != nil {
		return nil, err
	}
	if cfg.StatusListen != "" {
		if s.statusLn, err = listenStatus(cfg.StatusListen); err != nil {
			return nil, err
		}
	}

	s.dir = newRegistry(cfg.DirectoryTTL, s.log, time.Now())
	s.dir.setBundle(s.Roots())
	s.watches = newWatchLimit(cfg.MaxWatches)
	if err := s.initDenyList(time.Now()); err != nil {
		return nil, err
	}
	if err := s.loadFleetRotation(); err != nil {
		return nil, err
	}
	if err := s.loadEntries(); err != nil {
		return nil, err
	}
	if err := s.loadClaims(); err != nil {
		return nil, err
	}
	if err := s.loadAnchorRotation(); err != nil {
		return nil, err
	}
	// Registered last, so that a New that fails leaves the registry as it was.
	if err := metricreg.Register(cfg.Registerer, append(s.anchor.metrics.collectors(),
		append(s.wm.collectors(), s.db.lin.refusals, s.claims.metrics.refused, s.claims.metrics.learnt, s.statusRefused)...)...); err != nil {
		return nil, err
	}

	s.log.Info("ca prepared",
		keyTrustDomain, cfg.TrustDomain.Name(),
		keyStateDir, cfg.StateDir,
		keyKMS, s.auth.KMS(),
		keyFirstStart, s.auth.Created(),
		keyAddr, s.auth.Addr().String(),
		keyRootSPKI, spkiSHA256(s.auth.Root()),
		keyDuration, time.Since(started))
	return s, nil
}

// prepareStateDir creates the state directory 0700, or warns when an existing one is
// readable by others (its PIN file and token are 0600, but the directory should be too).
func prepareStateDir(dir string, log *slog.Logger) error {
	fi, err := os.Stat(dir)
	if errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("create state directory: %w", err)
		}
		return nil
	}
	if err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("%w: StateDir %s is not a directory", ErrInvalidConfig, dir)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		log.Warn("state directory is accessible to other users; chmod 0700 recommended",
			keyStateDir, dir, keyMode, fi.Mode().Perm().String())
	}
	return nil
}

// Addr is the bound address of the HTTPS API.
func (s *Server) Addr() net.Addr { return s.auth.Addr() }

// URL is the base URL local clients use for the HTTPS API, https://127.0.0.1:PORT when
// the listener is on all interfaces, else https://LISTEN-HOST:PORT. Its host is always in
// the serving certificate.
func (s *Server) URL() string { return s.auth.URL() }

// Roots returns the CA's trust anchors: its root, and during a rotation the roots of
// the generations it trusts. The caller may not modify them.
func (s *Server) Roots() []*x509.Certificate { return s.auth.Anchors() }

// Close releases what New acquired (listeners, admin socket, token session, database,
// state lock) when Run will not be called. Once Run has been called, Run owns these and
// releases them when it returns; Close then does nothing. Close is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.state != stateNew {
		s.mu.Unlock()
		return nil
	}
	s.state = stateClosed
	s.mu.Unlock()
	return s.release()
}

// Run serves step-ca's API over HTTPS and the admin API on the unix socket until ctx is
// done, then shuts the servers down, stops the authority (closing the KMS and the
// database) and returns once every goroutine it started has exited. It returns nil after
// a shutdown caused by ctx, the first serving error otherwise. Run may be called once.
func (s *Server) Run(ctx context.Context) (err error) {
	s.mu.Lock()
	if s.state != stateNew {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.state = stateRunning
	s.mu.Unlock()
	defer func() {
		if rerr := s.release(); err == nil && rerr != nil {
			err = boundary(rerr)
		}
	}()
	// Runs first: the last checkpoint of the CA's log is signed while the token is open.
	defer s.checkpointOwnLog(ctx)

	if err := s.auth.Start(authority.IssuePolicy{DB: s.db, Enforce: s.enforceNotRevoked, AuthorizeRenew: s.authorizeRenew}); err != nil {
		return boundary(err)
	}
	s.reconcileStepCA(ctx, s.auth.Step())
	// Before serving: a CA restarted mid-rotation trusts, issues from and publishes
	// what its recorded phase says from its first request on.
	s.resumeAnchorRotation(time.Now())

	errLog := slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)
	apiSrv := newHTTPServer(s.apiHandler(), errLog)
	apiSrv.MaxHeaderBytes = 64 << 10
	adminSrv := newHTTPServer(s.adminHandler(), errLog)
	adminSrv.ConnContext, adminSrv.IdleTimeout = withPeerCred, 0
	// The loopback status page; with no listener it is never started and its
	// shutdown returns at once.
	statusSrv := newHTTPServer(s.statusHandler(), errLog)

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return serveErr("https api", s.auth.Serve(apiSrv)) })
	g.Go(func() error { return serveErr("admin api", adminSrv.Serve(s.adminLn)) })
	if s.statusLn != nil {
		g.Go(func() error { return serveErr("status page", statusSrv.Serve(s.statusLn)) })
	}
	g.Go(func() error { s.auth.RenewServingCert(gctx); return nil })
	g.Go(func() error { s.dir.run(gctx); return nil })
	g.Go(func() error { s.pruneLoop(gctx); return nil })
	g.Go(func() error { s.anchorLoop(gctx); return nil })
	g.Go(func() error {
		<-gctx.Done()
		// Long-polls answer now rather than hold the graceful shutdown up.
		s.dir.close()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), shutdownTimeout)
		defer cancel()
		return errors.Join(shutdown(sctx, apiSrv), shutdown(sctx, adminSrv), shutdown(sctx, statusSrv))
	})
	s.log.Info("ca serving", keyURL, s.auth.URL(), keyAddr, s.auth.Addr().String(),
		keyAdminSocket, s.adminLn.Addr().String())
	if err := g.Wait(); err != nil {
		return boundary(err)
	}
	s.log.Info("ca stopped")
	return nil
}

// newHTTPServer is a server of h with the CA's timeouts.
func newHTTPServer(h http.Handler, errLog *log.Logger) *http.Server {
	return &http.Server{
		Handler:           h,
		ErrorLog:          errLog,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
}

func serveErr(what string, err error) error {
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("serve %s: %w", what, err)
}

// shutdown stops srv gracefully within ctx, then forcibly.
func shutdown(ctx context.Context, srv *http.Server) error {
	if err := srv.Shutdown(ctx); err != nil {
		_ = srv.Close()
		if !errors.Is(err, context.DeadlineExceeded) {
			return err
		}
	}
	return nil
}

// release frees everything New and Run acquired, once.
func (s *Server) release() error {
	var errs []error
	s.releaseOnce.Do(func() {
		if s.adminLn != nil {
			_ = s.adminLn.Close() // also unlinks the socket
		}
		if s.statusLn != nil {
			_ = s.statusLn.Close() // Serve closed it already when it ran
		}
		if s.auth != nil {
			var closeDB func() error
			if s.db.DB != nil {
				closeDB = s.db.Shutdown
			}
			// Once started, step-ca's authority closes the KMS and the database.
			if err := s.auth.Close(closeDB); err != nil {
				errs = append(errs, err)
			}
		}
		if s.lock != nil {
			_ = s.lock.Close() // drops the flock
		}
	})
	return errors.Join(errs...)
}

// boundary prefixes err with "ca: " unless it already carries the prefix (errors built on
// this package's sentinels do).
func boundary(err error) error {
	if err == nil || strings.HasPrefix(err.Error(), "ca: ") {
		return err
	}
	return fmt.Errorf("ca: %w", err)
}
