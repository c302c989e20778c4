package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
)

// keyServices is the log key of how many Services are in force.
const keyServices = "services"

// ErrStopped is returned by SetRoutes once the proxy has shut down.
var ErrStopped = errors.New("proxy: stopped")

// Routes reload live (SetRoutes). Each route's listener is keyed by its
// listen address: a route that keeps its address and settings keeps its
// listener and its connections; one whose settings change keeps the
// listener, and the connections accepted under the old settings are
// drained; a removed one stops accepting and its connections are drained.
// Draining is the credentials' (Drain): connections that end within the
// grace are not touched, the rest are closed, counted and recorded with
// reason "drained".

// route is a Route's settings and the connections accepted under them, so
// that a change or removal drains exactly those.
type route struct {
	Route
	mu      sync.Mutex
	conns   map[*tunnelConn]struct{}
	drained bool // its connections have been closed; a late one is closed on arrival
}

// track adds c to r's connections; false if r has already been drained.
func (r *route) track(c *tunnelConn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.drained {
		return false
	}
	if r.conns == nil {
		r.conns = make(map[*tunnelConn]struct{})
	}
	r.conns[c] = struct{}{}
	return true
}

func (r *route) untrack(c *tunnelConn) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.conns, c)
}

// routeListener is one route's listener; cur is the route it serves now.
type routeListener struct {
	ln  net.Listener
	cur atomic.Pointer[route]
	// removed is set before SetRoutes closes the listener, so that its accept
	// loop ends quietly: a removed listener's closing is not a failure.
	removed atomic.Bool
}

// routeSet holds the route listeners, in the order of the routes in force.
type routeSet struct {
	mu   sync.Mutex
	list []*routeListener
	// run and ctx are Run's group and context while it accepts: the
	// accept loops and drains of routes set later join them, so Run waits
	// for them. ended is set once the listeners are closed for good.
	run   *errgroup.Group
	ctx   context.Context
	ended bool
}

// listenRoute binds a listener for r.
func listenRoute(r Route) (*routeListener, error) {
	ln, err := net.Listen("tcp", r.Listen)
	if err != nil {
		return nil, fmt.Errorf("proxy: listen route %s: %w", r.Listen, err)
	}
	l := &routeListener{ln: ln}
	l.cur.Store(&route{Route: r})
	return l, nil
}

// startRoutes starts the accept loop of every route listener on g, and
// of every one SetRoutes adds until the listeners close.
func (p *Proxy) startRoutes(ctx context.Context, g *errgroup.Group) {
	p.routes.mu.Lock()
	defer p.routes.mu.Unlock()
	if p.routes.ended {
		return
	}
	p.routes.run, p.routes.ctx = g, ctx
	for _, l := range p.routes.list {
		p.startRouteLocked(l)
	}
}

// startRouteLocked starts l's accept loop on Run's group and context. A
// loop whose listener SetRoutes removed ends without an error. (A context
// derived per listener would not do: Run's shutdown wakes on its own context
// and closes the listeners before a derived one is cancelled.)
func (p *Proxy) startRouteLocked(l *routeListener) {
	ctx := p.routes.ctx
	p.routes.run.Go(func() error {
		err := p.acceptLoop(ctx, l.ln, Outbound, transportNone, func(c net.Conn) { p.serveRoute(ctx, c, l.cur.Load()) })
		if l.removed.Load() {
			return nil
		}
		return err
	})
}

// closeRoutes closes every route listener for good (Run's shutdown, Close).
func (p *Proxy) closeRoutes() []error {
	p.routes.mu.Lock()
	defer p.routes.mu.Unlock()
	p.routes.ended, p.routes.run = true, nil
	var errs []error
	for _, l := range p.routes.list {
		errs = append(errs, l.ln.Close())
	}
	return errs
}

// RouteAddr returns the listening address of the i-th route in force
// (Config.Routes, or the last SetRoutes).
func (p *Proxy) RouteAddr(i int) net.Addr {
	p.routes.mu.Lock()
	defer p.routes.mu.Unlock()
	return p.routes.list[i].ln.Addr()
}

// SetDrainGrace sets how long the connections of a route removed or changed
// by SetRoutes may run before they are closed: the grace the rotation policy
// gives a superseded credential's connections (policy.RotationPolicy.DrainGrace,
// its default until set). A grace <= 0 closes them at once.
func (p *Proxy) SetDrainGrace(grace time.Duration) { p.grace.Store(int64(grace)) }

// SetRoutes makes routes the explicit outbound routes in force. They are
// validated as Config.Routes are by New; an invalid set, or one whose new
// listeners cannot all be bound, changes nothing and returns the error
// (wrapping ErrInvalidConfig when invalid). A route with the same listen
// address and settings as one in force keeps its listener and connections; a
// new one listens (and accepts, when Run is running) before SetRoutes
// returns; a removed one stops accepting at once, and its connections, like
// those of a route whose settings changed at the same address, are drained
// after the grace (SetDrainGrace). Returns ErrStopped once the proxy has shut
// down. Safe for concurrent use.
func (p *Proxy) SetRoutes(routes []Route) error {
	next := p.cfg
	next.Routes = routes
	next = next.withDefaults()
	if err := next.validate(); err != nil {
		return err
	}
	p.routes.mu.Lock()
	defer p.routes.mu.Unlock()
	if p.routes.ended {
		return ErrStopped
	}
	old := p.routes.list
	kept := make([]bool, len(old))
	list := make([]*routeListener, len(next.Routes))
	var added []*routeListener
	for i, r := range next.Routes {
		if j := matchRoute(old, kept, r); j >= 0 {
			kept[j], list[i] = true, old[j]
			continue
		}
		l, err := listenRoute(r)
		if err != nil {
			for _, a := range added {
				_ = a.ln.Close()
			}
			return err
		}
		list[i] = l
		added = append(added, l)
	}
	// From here on nothing fails: the new set is in force.
	grace := time.Duration(p.grace.Load())
	for i, l := range list {
		if cur := l.cur.Load(); cur.Route != next.Routes[i] {
			l.cur.Store(&route{Route: next.Routes[i]})
			p.drainRouteLocked(cur, grace)
		}
	}
	for j, l := range old {
		if kept[j] {
			continue
		}
		l.removed.Store(true)
		_ = l.ln.Close() // nothing to do about a failed close of a listener we leave
		p.drainRouteLocked(l.cur.Load(), grace)
	}
	if p.routes.run != nil {
		for _, l := range added {
			p.startRouteLocked(l)
		}
	}
	p.routes.list = list
	return nil
}

// matchRoute is the index of the listener in old, not yet kept, that r keeps:
// the one at r's listen address, as configured or as bound (for port 0, only
// one with the same settings, since the address names no port); -1 for none.
func matchRoute(old []*routeListener, kept []bool, r Route) int {
	_, port, _ := net.SplitHostPort(r.Listen)
	for j, l := range old {
		if kept[j] {
			continue
		}
		cur := l.cur.Load()
		if cur.Listen == r.Listen && (port != "0" || cur.Route == r) || l.ln.Addr().String() == r.Listen {
			return j
		}
	}
	return -1
}

// drainRouteLocked drains r's connections after grace, on Run's group; before
// Run there are none.
func (p *Proxy) drainRouteLocked(r *route, grace time.Duration) {
	if p.routes.run == nil {
		r.mu.Lock()
		r.drained = true
		r.mu.Unlock()
		return
	}
	ctx := p.routes.ctx
	p.routes.run.Go(func() error {
		p.drainRoute(ctx, r, grace)
		return nil
	})
}

// drainRoute closes r's connections once grace has passed, as Drain closes a
// credential's. A shutdown first closes them itself.
func (p *Proxy) drainRoute(ctx context.Context, r *route, grace time.Duration) {
	if grace > 0 {
		timer := time.NewTimer(grace)
		defer timer.Stop()
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
	}
	r.mu.Lock()
	r.drained = true
	victims := make([]*tunnelConn, 0, len(r.conns))
	for c := range r.conns {
		victims = append(victims, c)
	}
	r.mu.Unlock()
	closed := 0
	for _, c := range victims {
		if c.drain() {
			closed++
		}
	}
	p.cfg.Logger.LogAttrs(ctx, slog.LevelInfo, "route drained",
		slog.String(keyListen, r.Listen),
		slog.Duration(keyGrace, grace),
		slog.Int(keyClosed, closed))
}
