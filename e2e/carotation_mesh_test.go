package e2e

import (
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"
)

// rotationMesh is the mesh TestCARotation rotates the CA's anchors under: a CA and the
// proxies a, b and c in network namespaces, each with a route to both others (a
// originates over h2, b over quic, c over tls) carrying a new connection every 100 ms
// and one long-lived keep-alive connection per route; and proxy d, with no routes,
// which the partition subtests cut off the CA.
type rotationMesh struct {
	// t is the test that started the mesh: its processes live until it ends.
	t       *testing.T
	hca     *lanHost
	hosts   map[string]*lanHost
	ca      *meshCA
	proxies map[string]*meshProxy
	load    *routeLoad
	streams *longStreams
	// seenRoots are the anchors the CA has served: its serving certificate chains to
	// one of them or to its root.crt.
	seenRoots []*x509.Certificate
	// metrics is the URL of the CA's /metrics, reached from the test's own address on
	// the LAN.
	metrics string
}

const (
	// rotationLifetime is the CA's SVID lifetime: activation waits until every
	// certificate issued before it has expired, so it sets the length of the rotation.
	rotationLifetime = 10 * time.Second
	// rotationRenewWindow spreads the proxies' renewals from the new key.
	rotationRenewWindow = 2 * time.Second
	// rotationTimeout bounds a whole rotation: a lifetime and a renew window in
	// activate, a few heartbeats for the other phases, CPU contention under -race.
	rotationTimeout = 90 * time.Second
)

// loadHosts are the proxies that carry the load; d only takes part in rotations.
var (
	loadHosts = []string{"a", "b", "c"}
	allHosts  = []string{"a", "b", "c", "d"}
)

// rotationProxyConfig is the end of the configuration of the proxy at ip, renewing
// when renewFraction of an SVID's lifetime remains: the time a CA being restarted, or a
// proxy cut off, still has before the SVID expires. Advertising its address makes it a
// member of the CA's directory, whose acknowledgements a rotation awaits; heartbeats
// every second keep the CA's view of the members fresh; the deny-list poll backs up the
// watch after a CA restart.
func rotationProxyConfig(ip string, renewFraction float64) string {
	return fmt.Sprintf("transports: [h2, quic, tls]\nrevocation:\n  poll: 1s\ndirectory:\n  heartbeat: 1s\n  advertise: [%s]\n"+
		"rotation:\n  renew_fraction: %v\n  retry_max: 1s\n", ip, renewFraction)
}

func hostID(name string) string { return "spiffe://" + trustDomain + "/host/" + name }

// startRotationMesh starts the mesh and its load and waits until every route has
// answered requests.
func startRotationMesh(t *testing.T) *rotationMesh {
	t.Helper()
	l := newLAN(t)
	m := &rotationMesh{t: t, hca: l.add("ca"), hosts: map[string]*lanHost{}, proxies: map[string]*meshProxy{}}
	for _, n := range allHosts {
		m.hosts[n] = l.add(n)
	}
	l.join()
	m.metrics = "http://" + m.hca.ip + ":9464/metrics"
	// A live window of three heartbeats: a proxy cut off shows as down within seconds.
	m.ca = startCAOn(t, m.hca.host, m.hca.ip+":9443", rotationLifetime, "--metrics", m.hca.ip+":9464",
		"--rotation-live-window", "3s")
	transports := map[string]string{"a": "h2", "b": "quic", "c": "tls"}
	for _, n := range loadHosts {
		h := m.hosts[n]
		svc := startCmd(t, "service-"+n, h.command(demoService, "-listen", "127.0.0.1:8080", "-name", "service-"+n))
		awaitListen(t, svc, 8080)
		var routes []route
		for _, peer := range m.peers(n) {
			routes = append(routes, route{listen: m.route(n, peer), peer: m.hosts[peer].ip + ":15008",
				peerID: hostID(peer), targetPort: 8080, transport: transports[n]})
		}
		allow := []string{hostID(m.peers(n)[0]), hostID(m.peers(n)[1])}
		m.startProxy(t, n, routes, []service{{port: 8080, allow: allow}}, 0.7)
	}
	// d, cut off the CA for seconds, renews every second or so: its SVID outlives a cut
	// of up to nine seconds.
	m.startProxy(t, "d", nil, nil, 0.9)

	m.streams = &longStreams{minLife: rotationLifetime / 2, drained: map[string]int{}}
	// Registered before the load's, so run after the load has stopped.
	t.Cleanup(m.streams.close)
	m.load = newRouteLoad(t)
	for _, from := range loadHosts {
		for _, to := range m.peers(from) {
			m.load.start(from, to, m.route(from, to))
			m.streams.keep(m.load, from+"->"+to, m.route(from, to))
		}
	}
	m.load.awaitRequests(t, nil, 5, "")
	return m
}

// startProxy starts proxy name on its host (see rotationProxyConfig), its admin port on its LAN address so that
// the test reaches /readyz and /metrics directly.
func (m *rotationMesh) startProxy(t *testing.T, name string, routes []route, services []service, renewFraction float64) {
	t.Helper()
	h := m.hosts[name]
	m.proxies[name] = startProxyOn(t, h.host, m.ca, name, "0.0.0.0:15008", h.ip+":15020", routes, services,
		rotationProxyConfig(h.ip, renewFraction))
}

// peers are the load hosts other than n.
func (m *rotationMesh) peers(n string) []string {
	return slices.DeleteFunc(slices.Clone(loadHosts), func(p string) bool { return p == n })
}

// route is the listen address, on from's LAN address, of its route to to.
func (m *rotationMesh) route(from, to string) string {
	return fmt.Sprintf("%s:%d", m.hosts[from].ip, 18000+slices.Index(loadHosts, to))
}

// cut drops every packet between name's host and the CA's, in name's namespace, and
// returns the function that lifts the cut (also called when the test ends, if it has
// not been).
func (m *rotationMesh) cut(t *testing.T, name string) func() {
	t.Helper()
	h := m.hosts[name]
	rules := [][]string{{"OUTPUT", "-d", m.hca.ip, "-j", "DROP"}, {"INPUT", "-s", m.hca.ip, "-j", "DROP"}}
	for _, r := range rules {
		h.mustRun(t, "iptables", append([]string{"-I"}, r...)...)
	}
	var once sync.Once
	lift := func() {
		once.Do(func() {
			// Not bound to the test's context, which has ended when a cleanup lifts it.
			for _, r := range rules {
				if out, err := h.command("iptables", append([]string{"-D"}, r...)...).CombinedOutput(); err != nil {
					t.Errorf("%s: lift the cut: %v\n%s", h.ns, err, out)
				}
			}
		})
	}
	t.Cleanup(lift)
	return lift
}

// loadMark is what the load had carried at one moment, to count what a subtest adds.
type loadMark struct {
	routes  map[string]routeResult
	streams longStreamCounts
}

func (m *rotationMesh) mark() loadMark {
	return loadMark{routes: m.load.results(), streams: m.streams.counts()}
}

// checkLoad fails the test if a request failed or a long-lived connection ended other
// than by a drain since mark, or if a route carried nothing, and prints what the load
// carried.
func (m *rotationMesh) checkLoad(t *testing.T, what string, since loadMark) {
	t.Helper()
	requests, failed := 0, 0
	for key, r := range m.load.results() {
		ok, bad := r.ok-since.routes[key].ok, r.failed-since.routes[key].failed
		requests, failed = requests+ok+bad, failed+bad
		if bad > 0 {
			t.Errorf("%s: route %s: %d of %d requests failed", what, key, bad, ok+bad)
		}
		if ok == 0 {
			t.Errorf("%s: route %s carried no request: the load proves nothing", what, key)
		}
	}
	s := m.streams.counts()
	for _, err := range s.errs[len(since.streams.errs):] {
		t.Errorf("%s: long-lived connection: %v", what, err)
	}
	fmt.Printf("carotation %s: requests=%d failed=%d long_lived_requests=%d long_lived_drained=%d long_lived_failed=%d\n",
		what, requests, failed, s.requests-since.streams.requests, s.drained-since.streams.drained, len(s.errs)-len(since.streams.errs))
}

// longStreams keeps one keep-alive HTTP connection open on each route, with a request
// on it every 250 ms. A connection may end only by a drain: once the credential that
// authenticated it has ended (overlap until its expiry, then the drain grace), which
// cannot be sooner than minLife after it opened; then a new one is opened.
type longStreams struct {
	minLife time.Duration

	mu       sync.Mutex
	routes   []*longRoute
	requests int
	drained  map[string]int
	errs     []error
}

type longStreamCounts struct {
	requests, drained int
	errs              []error
}

// keep runs the long-lived connection of route key (at addr) until l stops.
func (s *longStreams) keep(l *routeLoad, key, addr string) {
	r := &longRoute{key: key, addr: addr}
	s.mu.Lock()
	s.routes = append(s.routes, r)
	s.mu.Unlock()
	l.every(250*time.Millisecond, func() {
		if err := s.step(r); err != nil && l.ctx.Err() == nil {
			s.record(key, false, err)
		}
	})
}

// longRoute is the long-lived connection of one route, nil between a drain and the
// next tick.
type longRoute struct {
	key, addr string
	lc        *longConn
	opened    time.Time
}

// step opens r's connection, or makes a request on it, telling a drain from a failure.
func (s *longStreams) step(r *longRoute) error {
	if r.lc == nil {
		c, err := dialLong(r.addr)
		if err != nil {
			return fmt.Errorf("route %s: open: %w", r.key, err)
		}
		r.lc, r.opened = c, time.Now()
		return nil
	}
	err := r.lc.request()
	if err == nil {
		s.record(r.key, false, nil)
		return nil
	}
	lived := time.Since(r.opened)
	_ = r.lc.conn.Close() // ended: by a drain or a failure, told apart below
	r.lc = nil
	if lived < s.minLife {
		return fmt.Errorf("route %s: cut %v after it opened: %w", r.key, lived.Round(time.Millisecond), err)
	}
	s.record(r.key, true, nil)
	return nil
}

// close closes the connections left open, once the load has stopped.
func (s *longStreams) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range s.routes {
		if r.lc != nil {
			_ = r.lc.conn.Close() // nothing more is read from it
		}
	}
}

func (s *longStreams) record(key string, drained bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case err != nil:
		s.errs = append(s.errs, err)
	case drained:
		s.drained[key]++
	default:
		s.requests++
	}
}

func (s *longStreams) counts() longStreamCounts {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, d := range s.drained {
		n += d
	}
	return longStreamCounts{requests: s.requests, drained: n, errs: slices.Clone(s.errs)}
}

// caMetric sums the CA's metric name over the series with labels (0 when there is
// none).
func (m *rotationMesh) caMetric(t *testing.T, name string, labels ...string) (float64, bool) {
	t.Helper()
	v, err := scrapeMetric(m.metrics, name, labels...)
	if err != nil && !errors.Is(err, errNoMetric) {
		t.Fatalf("scrape the CA's metrics: %v", err)
	}
	return v, err == nil
}
