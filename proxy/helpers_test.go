package proxy_test

import (
	"context"
	"errors"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/proxy"
)

// waitLimit bounds every wait in these tests; reaching it is a failure, not
// a synchronisation mechanism.
const waitLimit = 20 * time.Second

var (
	idA = spiffeid.RequireFromString("spiffe://example.org/host/a")
	idB = spiffeid.RequireFromString("spiffe://example.org/host/b")
	idC = spiffeid.RequireFromString("spiffe://example.org/host/c")
)

// recorder is an in-memory Auditor. Tests wait on it for records instead of
// sleeping.
type recorder struct {
	mu     sync.Mutex
	events []audit.Event
	err    error
	notify chan struct{} // coalesced: one pending wake-up is enough
	gate   *gate         // nil: nothing is held
}

// gate holds the Append of the first record that matches until it is
// released, so a test can act while a proxy is between recording a
// handshake and using the connection.
type gate struct {
	match   func(audit.Event) bool
	held    chan struct{} // closed when a record is held
	release chan struct{} // closed by the release func
}

func newRecorder() *recorder { return &recorder{notify: make(chan struct{}, 1)} }

func (r *recorder) Append(e audit.Event) error {
	r.mu.Lock()
	if g := r.gate; g != nil && g.match(e) {
		r.gate = nil
		r.mu.Unlock()
		close(g.held)
		<-g.release
		r.mu.Lock()
	}
	if r.err != nil {
		r.mu.Unlock()
		return r.err
	}
	r.events = append(r.events, e)
	r.mu.Unlock()
	select {
	case r.notify <- struct{}{}:
	default:
	}
	return nil
}

// hold makes the next Append of a record that match selects wait until
// release is called (release is idempotent and also runs at cleanup); held
// is closed once that record waits.
func (r *recorder) hold(t testing.TB, match func(audit.Event) bool) (held <-chan struct{}, release func()) {
	t.Helper()
	g := &gate{match: match, held: make(chan struct{}), release: make(chan struct{})}
	r.mu.Lock()
	r.gate = g
	r.mu.Unlock()
	release = sync.OnceFunc(func() { close(g.release) })
	t.Cleanup(release)
	return g.held, release
}

// Sync acknowledges at once: a record in memory is as durable as this
// recorder gets. It fails while the recorder does.
func (r *recorder) Sync(context.Context) error { return r.Err() }

func (r *recorder) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

func (r *recorder) fail(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.err = err
}

func (r *recorder) handshakes() []audit.Handshake {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []audit.Handshake
	for _, e := range r.events {
		if h, ok := e.(audit.Handshake); ok {
			out = append(out, h)
		}
	}
	return out
}

// waitFor waits until some record satisfies match (records already appended
// count) and returns the first one that does.
func waitFor[E audit.Event](t testing.TB, r *recorder, what string, match func(E) bool) E {
	t.Helper()
	return waitForFrom(t, r, 0, what, match)
}

// waitForFrom is waitFor among the records appended after the first from.
func waitForFrom[E audit.Event](t testing.TB, r *recorder, from int, what string, match func(E) bool) E {
	t.Helper()
	timer := time.NewTimer(waitLimit)
	defer timer.Stop()
	for {
		r.mu.Lock()
		for _, e := range r.events[min(from, len(r.events)):] {
			if ev, ok := e.(E); ok && match(ev) {
				r.mu.Unlock()
				return ev
			}
		}
		r.mu.Unlock()
		select {
		case <-r.notify:
		case <-timer.C:
			var zero E
			t.Fatalf("no %s record matching %s after %s; have %+v", zero.Kind(), what, waitLimit, r.snapshot())
			return zero
		}
	}
}

// len returns how many records have been appended.
func (r *recorder) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.events)
}

func (r *recorder) snapshot() []audit.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]audit.Event(nil), r.events...)
}

// node is one proxy under test with everything needed to inspect it.
type node struct {
	*proxy.Proxy
	id    spiffeid.ID
	creds *testca.Credentials
	audit *recorder
	reg   *prometheus.Registry
	stop  func() // cancels Run and waits for it; idempotent
}

// start creates a proxy from cfg (filling in Credentials, Audit, Registerer
// and loopback listeners) and runs it until the test ends.
func start(t testing.TB, ca *testca.CA, id spiffeid.ID, cfg proxy.Config) *node {
	t.Helper()
	n := &node{id: id, audit: newRecorder(), reg: prometheus.NewRegistry()}
	if cfg.Credentials == nil {
		n.creds = testca.NewCredentials(ca, ca.SVID(t, id))
		cfg.Credentials = n.creds
	}
	cfg.ID = id
	if cfg.Audit == nil {
		cfg.Audit = n.audit
	}
	cfg.Registerer = n.reg
	if cfg.RefusalInterval == 0 {
		// Aggregated refusals are written at once, for tests to wait on.
		cfg.RefusalInterval = 20 * time.Millisecond
	}
	if cfg.TunnelListen == "" {
		cfg.TunnelListen = "127.0.0.1:0"
	}
	p, err := proxy.New(cfg)
	if err != nil {
		t.Fatalf("proxy.New: %v", err)
	}
	n.Proxy = p
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	n.stop = sync.OnceFunc(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(waitLimit):
			t.Errorf("Run did not return within %s of cancellation", waitLimit)
		}
	})
	t.Cleanup(n.stop)
	return n
}

// metric returns the value of the counter or gauge name{labels} (the sample
// count of a histogram), summed over the series whose labels include
// labels; 0 when there is none.
func (n *node) metric(t testing.TB, name string, labels map[string]string) float64 {
	t.Helper()
	families, err := n.reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	var sum float64
	for _, f := range families {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			if !labelsMatch(m, labels) {
				continue
			}
			switch {
			case m.Counter != nil:
				sum += m.Counter.GetValue()
			case m.Gauge != nil:
				sum += m.Gauge.GetValue()
			case m.Histogram != nil:
				sum += float64(m.Histogram.GetSampleCount())
			}
		}
	}
	return sum
}

func labelsMatch(m *dto.Metric, want map[string]string) bool {
	have := map[string]string{}
	for _, l := range m.GetLabel() {
		have[l.GetName()] = l.GetValue()
	}
	for k, v := range want {
		if have[k] != v {
			return false
		}
	}
	return true
}

// target is a local TCP server standing in for an agent behind proxy B.
type target struct {
	ln   net.Listener
	port uint16
}

// startTarget serves every connection with handle until the test ends.
func startTarget(t testing.TB, handle func(*net.TCPConn)) *target {
	t.Helper()
	return startTargetAt(t, "127.0.0.1:0", handle)
}

// startTargetAt is startTarget listening on addr.
func startTargetAt(t testing.TB, addr string, handle func(*net.TCPConn)) *target {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer func() { _ = c.Close() }()
				handle(c.(*net.TCPConn))
			})
		}
	})
	_, portStr, _ := net.SplitHostPort(ln.Addr().String())
	port, _ := strconv.Atoi(portStr)
	return &target{ln: ln, port: uint16(port)}
}

// echo copies everything back and half-closes when the client did.
func echo(c *net.TCPConn) {
	if _, err := c.ReadFrom(c); err == nil {
		_ = c.CloseWrite()
	}
}

// mesh is A (a route to B) and B (a service in front of a target).
type mesh struct {
	ca     *testca.CA
	a, b   *node
	target *target
}

func newMesh(t testing.TB, handle func(*net.TCPConn)) *mesh {
	t.Helper()
	ca := testca.New(t)
	tg := startTarget(t, handle)
	b := start(t, ca, idB, proxy.Config{
		Services: []proxy.Service{{Port: tg.port, Allow: []spiffeid.ID{idA}}},
	})
	a := start(t, ca, idA, proxy.Config{
		Routes: []proxy.Route{{Listen: "127.0.0.1:0", Peer: b.TunnelAddr().String(), PeerID: idB, TargetPort: tg.port}},
	})
	return &mesh{ca: ca, a: a, b: b, target: tg}
}

// dialRoute connects to A's route as an agent would.
func (m *mesh) dialRoute(t testing.TB) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", m.a.RouteAddr(0).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(waitLimit))
	return c.(*net.TCPConn)
}

var errTest = errors.New("test: injected failure")

// The real implementations satisfy the consumer-side interfaces.
var (
	_ proxy.Credentials = (*testca.Credentials)(nil)
	_ proxy.AuditLog    = (*audit.Log)(nil)
)
