package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sync/errgroup"
)

// Proxy carries agent connections through mTLS tunnels: outbound from its
// Routes to peer proxies, inbound from peer proxies to its Services.
type Proxy struct {
	cfg     Config
	metrics *metrics
	limit   limiter
	buffers sync.Pool // *[]byte of spliceBufferSize

	serverTLS *tls.Config
	tunnelLn  net.Listener
	routes    []*route

	services        map[uint16]map[spiffeid.ID]struct{} // port -> allowed peers
	allowedAnywhere map[spiffeid.ID]struct{}            // union of every Allow

	registry  registry
	handlers  sync.WaitGroup // one per accepted connection
	started   atomic.Bool
	closeOnce sync.Once
	closeErr  error // set once by closeListeners
}

// route is a Route with its listener and its tls.Config, built once.
type route struct {
	Route
	ln  net.Listener
	tls *tls.Config
}

// New validates cfg, binds the tunnel and route listeners (so port 0 works
// and the addresses are known before Run) and builds the TLS configurations.
// It starts no goroutines. If Run is never called, Close releases the
// listeners.
func New(cfg Config) (*Proxy, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	p := &Proxy{
		cfg:             cfg,
		limit:           newLimiter(cfg.MaxConnections),
		services:        make(map[uint16]map[spiffeid.ID]struct{}, len(cfg.Services)),
		allowedAnywhere: make(map[spiffeid.ID]struct{}),
	}
	p.buffers.New = func() any {
		b := make([]byte, spliceBufferSize)
		return &b
	}
	for _, s := range cfg.Services {
		allow := make(map[spiffeid.ID]struct{}, len(s.Allow))
		for _, id := range s.Allow {
			allow[id] = struct{}{}
			p.allowedAnywhere[id] = struct{}{}
		}
		p.services[s.Port] = allow
	}
	p.serverTLS = p.serverTLSConfig()

	var err error
	if p.tunnelLn, err = net.Listen("tcp", cfg.TunnelListen); err != nil {
		return nil, fmt.Errorf("proxy: listen tunnel %s: %w", cfg.TunnelListen, err)
	}
	for _, r := range cfg.Routes {
		ln, lerr := net.Listen("tcp", r.Listen)
		if lerr != nil {
			p.closeListeners()
			return nil, fmt.Errorf("proxy: listen route %s: %w", r.Listen, lerr)
		}
		p.routes = append(p.routes, &route{Route: r, ln: ln, tls: p.clientTLSConfig(r.PeerID)})
	}
	// Metrics last: a failed New must not leave collectors registered.
	if p.metrics, err = newMetrics(cfg.Registerer); err != nil {
		p.closeListeners()
		return nil, fmt.Errorf("proxy: %w", err)
	}
	return p, nil
}

// TunnelAddr returns the address inbound tunnels are accepted on.
func (p *Proxy) TunnelAddr() net.Addr { return p.tunnelLn.Addr() }

// RouteAddr returns the listening address of Config.Routes[i].
func (p *Proxy) RouteAddr(i int) net.Addr { return p.routes[i].ln.Addr() }

// Ready reports whether the proxy can complete handshakes: nil when
// Credentials has a valid SVID and the audit log is healthy.
func (p *Proxy) Ready() error {
	if _, err := p.cfg.Credentials.TLSCertificate(); err != nil {
		return fmt.Errorf("%w: %w", ErrNoSVID, err)
	}
	if err := p.auditErr(); err != nil {
		return err
	}
	return nil
}

// auditErr is non-nil when the audit log cannot take records.
func (p *Proxy) auditErr() error {
	if p.cfg.Audit == nil {
		return nil
	}
	if err := p.cfg.Audit.Err(); err != nil {
		return fmt.Errorf("%w: %w", ErrAuditUnavailable, err)
	}
	return nil
}

// Run accepts connections until ctx is done, then closes the listeners and
// every live connection, and returns once all goroutines it started have
// exited. It returns nil after a shutdown through ctx, and an error if a
// listener fails for good. Run may be called once.
func (p *Proxy) Run(ctx context.Context) error {
	if !p.started.CompareAndSwap(false, true) {
		return ErrAlreadyStarted
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		<-gctx.Done()
		_ = p.closeListeners() // nothing to do about a failed close at shutdown
		return nil
	})
	g.Go(func() error {
		return p.acceptLoop(gctx, p.tunnelLn, func(c net.Conn) { p.serveInbound(gctx, c) })
	})
	for _, r := range p.routes {
		g.Go(func() error {
			return p.acceptLoop(gctx, r.ln, func(c net.Conn) { p.serveOutbound(gctx, c, r) })
		})
	}
	err := g.Wait()
	// Handlers watch gctx, which is done once Wait returns: they close their
	// sockets and exit.
	p.handlers.Wait()
	return err
}

// Close closes the listeners. It is for a Proxy whose Run will not be
// called; Run does it itself on shutdown. Idempotent.
func (p *Proxy) Close() error {
	return p.closeListeners()
}

func (p *Proxy) closeListeners() error {
	p.closeOnce.Do(func() {
		var errs []error
		if p.tunnelLn != nil {
			errs = append(errs, p.tunnelLn.Close())
		}
		for _, r := range p.routes {
			errs = append(errs, r.ln.Close())
		}
		if err := errors.Join(errs...); err != nil {
			p.closeErr = fmt.Errorf("proxy: close listeners: %w", err)
		}
	})
	return p.closeErr
}
