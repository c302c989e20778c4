package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
	"golang.org/x/sync/errgroup"

	"github.com/agentmesh/agentmesh/policy"
)

// Proxy carries agent connections through mTLS tunnels: outbound from its
// Routes and its capture listeners (transparent and explicit) to peer
// proxies, inbound from peer proxies to its Services.
type Proxy struct {
	chains  chainCache // x509svid verifications of peer chains
	cfg     Config
	metrics *metrics
	limit   limiter    // MaxConnections: every listener and the quic transport
	buffers sync.Pool  // *[]byte of spliceBufferSize
	dialer  net.Dialer // every dial: DialTimeout, and SO_MARK when Mark is set

	// handshakes is MaxHandshakes: inbound handshakes in flight, tls and
	// quic. refusals aggregates refused pre-authentication attempts.
	handshakes limiter
	refusals   *refusals

	// locals holds the TLS configurations of each local identity's current
	// SVID (see localFor), an immutable map replaced as a whole; localMu
	// serialises rebuilding it. noSVIDTLS runs inbound handshakes that have
	// no SVID to present.
	locals    atomic.Pointer[map[spiffeid.ID]*localTLS]
	localMu   sync.Mutex
	noSVIDTLS *tls.Config
	tickets   *ticketKeys
	deny      atomic.Pointer[denyState]  // nil: no deny-list
	authz     atomic.Pointer[authzState] // never nil once New returns
	authzMu   sync.Mutex                 // serialises SetPolicy's version counter

	tunnelLn   net.Listener
	udp        net.PacketConn  // the quic transport's socket; nil without quic
	quicTr     *quic.Transport // on udp: inbound and outbound quic connections
	quicLn     *quic.Listener
	quicJunk   *junkTrace   // quicTr's Tracer; nil without quic
	quicClient *quic.Config // for outbound quic connections
	outboundLn net.Listener // nil when transparent capture is off
	explicitLn net.Listener // nil when explicit capture is off
	strictLn   net.Listener // nil when strict mode is off
	routes     routeSet
	grace      atomic.Int64     // SetDrainGrace: a removed route's connections' grace
	self       []netip.AddrPort // tunnel, outbound and explicit listeners: loop detection

	// outboundAlt is the other family's loopback at outboundLn's port,
	// when Outbound is a loopback address (listenOtherLoopback).
	outboundAlt net.Listener
	hostAddrs   hostAddrSet // this host's addresses: who capture carries

	registry  registry
	pool      pool             // outbound pooled connections (h2, quic)
	h2t       *http2.Transport // client side of every outbound h2 connection
	handlers  sync.WaitGroup   // one per accepted connection, and per stream of a quic connection
	started   atomic.Bool
	closeOnce sync.Once
	closeErr  error // set once by closeListeners
}

// New validates cfg, binds the tunnel, capture and route listeners (so port
// 0 works and the addresses are known before Run) and builds the TLS
// configurations. It starts no goroutines. If Run is never called, Close
// releases the listeners.
func New(cfg Config) (*Proxy, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	p := &Proxy{
		cfg:        cfg,
		limit:      newLimiter(cfg.MaxConnections),
		handshakes: newLimiter(cfg.MaxHandshakes),
		refusals:   newRefusals(cfg.RefusalSources),
		dialer:     net.Dialer{Timeout: cfg.DialTimeout},
	}
	p.grace.Store(int64(policy.DefaultDrainGrace))
	if cfg.Mark != 0 {
		if err := checkMark(cfg.Mark); err != nil {
			return nil, fmt.Errorf("proxy: %w", err)
		}
		p.dialer.Control = markControl(cfg.Mark)
	}
	p.pool = pool{p: p, conns: make(map[poolKey][]*muxConn),
		current: make(map[spiffeid.ID]string)}
	if cfg.offers(TransportH2) {
		p.h2t = newH2Transport()
	}
	p.buffers.New = func() any {
		b := make([]byte, spliceBufferSize)
		return &b
	}
	p.noSVIDTLS = p.noSVIDTLSConfig()
	p.authz.Store(&authzState{policy: cfg.Policy, version: 1, services: newServiceSet(cfg.Services), gen: 1})

	var err error
	// Before any listener: the random source is the only thing that can
	// fail here.
	if p.tickets, err = newTicketKeys(cfg.Now(), func(trigger string) {
		p.metrics.rotations.WithLabelValues(trigger).Inc()
	}, p.recordKeyState); err != nil {
		return nil, fmt.Errorf("proxy: session-ticket key: %w", err)
	}
	if p.tunnelLn, err = net.Listen("tcp", cfg.TunnelListen); err != nil {
		return nil, fmt.Errorf("proxy: listen tunnel %s: %w", cfg.TunnelListen, err)
	}
	p.self = append(p.self, addrPortOf(p.tunnelLn.Addr()))
	if cfg.offers(TransportQUIC) {
		if err := p.listenQUIC(p.tunnelLn.Addr()); err != nil {
			_ = p.closeListeners()
			return nil, fmt.Errorf("proxy: %w", err)
		}
	}
	for _, l := range []struct {
		what, addr string
		ln         *net.Listener
	}{
		{what: "outbound", addr: cfg.Outbound, ln: &p.outboundLn},
		{what: "explicit", addr: cfg.Explicit, ln: &p.explicitLn},
		{what: "strict", addr: cfg.Strict, ln: &p.strictLn},
	} {
		if l.addr == "" {
			continue
		}
		ln, lerr := net.Listen("tcp", l.addr)
		if lerr != nil {
			_ = p.closeListeners()
			return nil, fmt.Errorf("proxy: listen %s %s: %w", l.what, l.addr, lerr)
		}
		*l.ln = ln
		p.self = append(p.self, addrPortOf(ln.Addr()))
	}
	if p.outboundLn != nil {
		if p.outboundAlt, err = listenOtherLoopback(p.outboundLn); err != nil {
			_ = p.closeListeners()
			return nil, fmt.Errorf("proxy: %w", err)
		}
		if p.outboundAlt != nil {
			p.self = append(p.self, addrPortOf(p.outboundAlt.Addr()))
		}
	}
	for _, r := range cfg.Routes {
		l, lerr := listenRoute(r)
		if lerr != nil {
			_ = p.closeListeners()
			return nil, lerr
		}
		p.routes.list = append(p.routes.list, l)
	}
	// Metrics last: a failed New must not leave collectors registered.
	if p.metrics, err = newMetrics(cfg.Registerer); err != nil {
		_ = p.closeListeners()
		return nil, fmt.Errorf("proxy: %w", err)
	}
	if p.quicJunk != nil {
		p.quicJunk.ready.Store(true)
	}
	return p, nil
}

// TunnelAddr returns the address inbound tunnels are accepted on.
func (p *Proxy) TunnelAddr() net.Addr { return p.tunnelLn.Addr() }

// OutboundAddr returns the transparent-capture listener's address, nil when
// Config.Outbound is empty.
func (p *Proxy) OutboundAddr() net.Addr { return listenerAddr(p.outboundLn) }

// ExplicitAddr returns the explicit-capture (SOCKS5 and HTTP proxy)
// listener's address, nil when Config.Explicit is empty.
func (p *Proxy) ExplicitAddr() net.Addr { return listenerAddr(p.explicitLn) }

// StrictAddr returns the strict-mode listener's address, nil when
// Config.Strict is empty.
func (p *Proxy) StrictAddr() net.Addr { return listenerAddr(p.strictLn) }

func listenerAddr(ln net.Listener) net.Addr {
	if ln == nil {
		return nil
	}
	return ln.Addr()
}

// Ready reports whether the proxy can complete handshakes: nil when
// Credentials has a valid SVID that the deny-list in force does not deny,
// Config.Revocation (if set) reports the deny-list current, and the audit
// log is healthy. Errors wrap ErrNoSVID, ErrRevoked, ErrRevocationStale or
// ErrAuditUnavailable.
func (p *Proxy) Ready() error {
	if _, err := p.local(); err != nil {
		return err
	}
	if err := p.revocationErr(); err != nil {
		return err
	}
	if err := p.auditErr(); err != nil {
		return err
	}
	return nil
}

// revocationErr is non-nil when Config.Revocation reports the deny-list
// stale.
func (p *Proxy) revocationErr() error {
	if p.cfg.Revocation == nil {
		return nil
	}
	if err := p.cfg.Revocation(); err != nil {
		return fmt.Errorf("%w: %w", ErrRevocationStale, err)
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
	// The first ticket key's activation, queued by New, is recorded
	// before anything can be accepted.
	p.tickets.flush()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		<-gctx.Done()
		_ = p.closeListeners() // nothing to do about a failed close at shutdown
		return nil
	})
	g.Go(func() error {
		p.rotateTicketKeys(gctx)
		return nil
	})
	g.Go(func() error {
		p.reap(gctx)
		return nil
	})
	g.Go(func() error {
		p.flushRefusals(gctx)
		return nil
	})
	g.Go(func() error {
		return p.acceptLoop(gctx, p.tunnelLn, Inbound, TransportTLS, func(c net.Conn) { p.serveInbound(gctx, c) })
	})
	if p.quicLn != nil {
		g.Go(func() error { return p.acceptQUIC(gctx) })
		g.Go(func() error {
			p.readNonQUIC(gctx)
			return nil
		})
	}
	if p.outboundLn != nil {
		g.Go(func() error {
			return p.acceptLoop(gctx, p.outboundLn, Outbound, transportNone, func(c net.Conn) { p.serveTransparent(gctx, c) })
		})
	}
	if p.outboundAlt != nil {
		g.Go(func() error {
			return p.acceptLoop(gctx, p.outboundAlt, Outbound, transportNone, func(c net.Conn) { p.serveTransparent(gctx, c) })
		})
	}
	if p.explicitLn != nil {
		g.Go(func() error {
			return p.acceptLoop(gctx, p.explicitLn, Outbound, transportNone, func(c net.Conn) { p.serveExplicit(gctx, c) })
		})
	}
	if p.strictLn != nil {
		g.Go(func() error {
			return p.acceptLoop(gctx, p.strictLn, Inbound, transportNone, func(c net.Conn) { p.serveStrict(gctx, c) })
		})
	}
	p.startRoutes(gctx, g)
	err := g.Wait()
	// Handlers watch gctx, which is done once Wait returns: they close their
	// sockets and exit. reap has closed every pooled connection, which ends
	// the goroutines that served them.
	p.handlers.Wait()
	p.pool.tasks.Wait()
	_ = p.closeQUIC() // every quic connection has been closed properly by now
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
		for _, ln := range []net.Listener{p.tunnelLn, p.outboundLn, p.outboundAlt, p.explicitLn, p.strictLn} {
			if ln != nil {
				errs = append(errs, ln.Close())
			}
		}
		errs = append(errs, p.closeRoutes()...)
		if p.quicLn != nil {
			errs = append(errs, p.quicLn.Close())
		}
		// A running proxy closes the quic transport itself once its
		// connections are closed; otherwise nothing else will.
		if !p.started.Load() {
			errs = append(errs, p.closeQUIC())
		}
		if err := errors.Join(errs...); err != nil {
			p.closeErr = fmt.Errorf("proxy: close listeners: %w", err)
		}
	})
	return p.closeErr
}
