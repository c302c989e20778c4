package e2e

import (
	"bufio"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	endian "encoding/binary"
	"errors"
	"fmt"
	"github.com/agentmesh/agentmesh/meshclient"
	"io"
	"math"
	"net"
	"net/http"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"go.step.sm/crypto/pemutil"
)

// TestRevocation revokes a host identity while three proxies in network namespaces carry
// new-connection load and long-lived connections between every pair (over the tls, h2 and
// quic transports), and measures, on
// every proxy, the time from the revoke command to the first refused handshake and to the
// last live connection of the victim closed. Then it cuts one proxy off the CA and checks
// that it alerts, keeps its list and converges within a poll of reconnecting.
func TestRevocation(t *testing.T) {
	requireE2E(t)
	requireRoot(t)
	l := newLAN(t)
	hca, a, b, c := l.add("ca"), l.add("a"), l.add("b"), l.add("c")
	l.join()
	hosts := map[string]*lanHost{"a": a, "b": b, "c": c}
	names := []string{"a", "b", "c"}
	id := func(n string) string { return "spiffe://" + trustDomain + "/host/" + n }
	victim := "c"
	// Each host originates over another transport, so the victim's connections, pooled
	// or not, run over all three.
	transports := map[string]string{"a": "h2", "b": "quic", "c": "tls"}

	authority := startCAOn(t, hca.host, hca.ip+":9443", time.Minute)
	const poll = time.Second
	proxies := map[string]*meshProxy{}
	for _, n := range names {
		h := hosts[n]
		svc := startCmd(t, "service-"+n, h.command(demoService, "-listen", "127.0.0.1:8080", "-name", "service-"+n))
		awaitListen(t, svc, 8080)
		var routes []route
		var allow []string
		for j, m := range names {
			if m == n {
				continue
			}
			allow = append(allow, id(m))
			routes = append(routes, route{listen: fmt.Sprintf("%s:%d", h.ip, 18000+j), peer: hosts[m].ip + ":15008",
				peerID: id(m), targetPort: 8080, transport: transports[n]})
		}
		proxies[n] = startProxyOn(t, h.host, authority, n, "0.0.0.0:15008", "127.0.0.1:15020", routes,
			[]service{{port: 8080, allow: allow}}, fmt.Sprintf("transports: [h2, quic, tls]\nrevocation:\n  poll: %s\n", poll))
	}
	for _, n := range names {
		awaitDenyList(t, proxies[n], 0, 60*time.Second)
	}
	routeAddr := func(from, to string) string {
		return fmt.Sprintf("%s:%d", hosts[from].ip, 18000+slices.Index(names, to))
	}

	// A second holder of the victim's identity, enrolled by the test: it shows that
	// renewal is refused and that a resumed session is refused once the identity is revoked.
	rogue := enrollAs(t, authority, id(victim))
	rogue.renew(t) // renewal works before the revocation
	sessions := tls.NewLRUClientSessionCache(4)
	if resumed := rogue.tunnel(t, a.ip+":15008", sessions); resumed {
		t.Fatal("the first tunnel handshake claims to be resumed")
	}
	if resumed := rogue.tunnel(t, a.ip+":15008", sessions); !resumed {
		t.Fatal("the second tunnel handshake did not resume: resumption is not exercised")
	}

	// Load: a new connection per request on every route, and one long-lived connection
	// on every route.
	load := newRouteLoad(t)
	for _, from := range names {
		for _, to := range names {
			if from != to {
				load.start(from, to, routeAddr(from, to))
			}
		}
	}
	// The rogue holder of the victim's identity keeps opening (and resuming) tunnels to
	// the other proxies, so each of them shows when it starts refusing the identity.
	for _, n := range names {
		if n != victim {
			load.rogue(rogue, hosts[n].ip+":15008")
		}
	}
	load.awaitRequests(t, nil, 5, "")
	victimSerial := currentSerial(t, proxies[victim], id(victim))

	started := time.Now()
	out, errOut, err := runCmd(t.Context(), "revoke", "--state", authority.state, id(victim), "--reason", "key-compromise")
	returned := time.Now()
	if err != nil {
		t.Fatalf("agentmesh revoke: %v\n%s", err, errOut)
	}
	version := listVersion(t, out)
	t.Logf("revoke took %v: %s", returned.Sub(started), strings.TrimSpace(out))

	for _, n := range names {
		if n != victim {
			awaitDenyList(t, proxies[n], version, 30*time.Second)
		}
	}
	// Every proxy has refused the victim or closed its connections, and the other
	// routes carried a few more requests each under the new list.
	waitFor(t, 30*time.Second, "the revocation enforced by every proxy", func() error {
		for _, n := range names {
			if _, _, ok := victimTimes(readAudit(t, proxies[n].auditPath()), id(victim), n == victim, started); !ok {
				return fmt.Errorf("%s: no refused handshake or closed connection of the victim yet", n)
			}
		}
		return nil
	})
	load.awaitRequests(t, load.total(), 5, victim)
	load.stop()

	// Long-lived connections: the victim's are closed, the others still answer.
	for key, lc := range load.long {
		involved := strings.Contains(key, victim)
		alive := lc.alive()
		switch {
		case involved && alive:
			t.Errorf("long-lived connection %s survived the revocation", key)
		case !involved && !alive:
			t.Errorf("long-lived connection %s between unrevoked identities was closed", key)
		}
	}
	// Other identities saw no failure throughout.
	for key, r := range load.results() {
		if !strings.Contains(key, victim) && r.failed > 0 {
			t.Errorf("route %s: %d of %d requests failed", key, r.failed, r.ok+r.failed)
		}
		if r.ok == 0 {
			t.Errorf("route %s: no request succeeded: the load proves nothing", key)
		}
	}

	// Enforcement times, from each proxy's audit log.
	var enforced, closed []time.Duration
	for _, n := range names {
		recs := readAudit(t, proxies[n].auditPath())
		refused, last, ok := victimTimes(recs, id(victim), n == victim, started)
		if !ok {
			t.Errorf("%s: no refused handshake or closed connection of the victim after the revocation", n)
			continue
		}
		// Measured from the start of the command, which is stricter than from its
		// return: the CA publishes the list before it revokes in step-ca and answers.
		enforced = append(enforced, refused.Sub(started))
		closed = append(closed, last.Sub(started))
		t.Logf("%s: first refused handshake %v, last victim connection closed %v after revoke started",
			n, refused.Sub(started), last.Sub(started))
	}
	if len(enforced) == 0 {
		t.FailNow()
	}
	maxEnforced, maxClosed := slices.Max(enforced), slices.Max(closed)
	fmt.Printf("revocation_enforced_max_ms=%d live_closed_max_ms=%d (from the start of agentmesh revoke, which returned after %d ms)\n",
		maxEnforced.Milliseconds(), maxClosed.Milliseconds(), returned.Sub(started).Milliseconds())
	// The 1 s target is measured by make bench (revocation); here the enforcement only
	// has to happen, within a deadline that CPU contention cannot miss.
	if maxEnforced > 15*time.Second || maxClosed > 15*time.Second {
		t.Errorf("revocation enforced in %v, live connections closed in %v: want both within 15s", maxEnforced, maxClosed)
	}

	// The victim: not ready, no renewal, serials in the CRL, no resumption.
	if code, _ := c.run(t, 10*time.Second, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:15020/readyz"); code != "503" {
		t.Errorf("the revoked host's /readyz answered %s, want 503", code)
	}
	if err := rogue.renewErr(t); err == nil {
		t.Error("a revoked identity renewed its certificate")
	}
	crl := fetchCRL(t, authority, rogue)
	for _, s := range []string{victimSerial, rogue.svid.Certificates[0].SerialNumber.String()} {
		if !slices.Contains(crl, s) {
			t.Errorf("serial %s of the victim is not in the CRL %v", s, crl)
		}
	}
	if rogue.tunnelErr(a.ip+":15008", sessions) == nil {
		t.Error("a revoked identity resumed a tunnel session")
	}
	wantRecord(t, proxies["a"], map[string]string{"type": "handshake", "direction": "inbound", "result": "refused",
		"reason": "revoked", "peer_id": id(victim)})

	// Only an administrator may revoke.
	nobody := b.command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
		binary, "revoke", "--state", authority.state, id("a"), "--reason", "test")
	if out, err := nobody.CombinedOutput(); err == nil {
		t.Errorf("an unprivileged user revoked an identity: %s", out)
	}

	partition(t, authority, hca, hosts, proxies, version, poll)
}

// partition cuts b off the CA, revokes another identity, and checks that b alerts,
// keeps the list it has and applies the new one within a poll of reconnecting.
func partition(t *testing.T, authority *meshCA, hca *lanHost, hosts map[string]*lanHost, proxies map[string]*meshProxy, held uint64, poll time.Duration) {
	b := hosts["b"]
	block := [][]string{
		{"OUTPUT", "-d", hca.ip, "-p", "tcp", "--dport", "9443", "-j", "REJECT", "--reject-with", "icmp-port-unreachable"},
		{"INPUT", "-s", hca.ip, "-p", "tcp", "--sport", "9443", "-j", "DROP"},
	}
	for _, r := range block {
		b.mustRun(t, "iptables", append([]string{"-I"}, r...)...)
	}
	waitFor(t, 30*time.Second, "b: revocation feed down", func() error {
		if up := adminMetricIn(t, b, "agentmesh_revocation_feed_up"); up != 0 {
			return fmt.Errorf("agentmesh_revocation_feed_up %v", up)
		}
		return nil
	})

	out, errOut, err := runCmd(t.Context(), "revoke", "--state", authority.state,
		"spiffe://"+trustDomain+"/host/d", "--reason", "decommissioned")
	if err != nil {
		t.Fatalf("agentmesh revoke: %v\n%s", err, errOut)
	}
	next := listVersion(t, out)
	awaitDenyList(t, proxies["a"], next, 30*time.Second)
	// b has failed to reach the feed (above) and still holds its last good list.
	if got := metric(t, b, "agentmesh_revocation_list_version"); got != float64(held) {
		t.Errorf("partitioned proxy holds deny-list version %v, want %d (the last good one)", got, held)
	}

	for _, r := range block {
		b.mustRun(t, "iptables", append([]string{"-D"}, r...)...)
	}
	healed := time.Now()
	// The list has to arrive; how soon after reconnecting (one poll when the machine is
	// idle) is printed, not asserted, since under -race CPU contention decides it.
	applied := awaitDenyList(t, proxies["b"], next, 30*time.Second)
	fmt.Printf("partition_converged_ms=%d (poll %v)\n", recordTime(t, applied).Sub(healed).Milliseconds(), poll)
}

// listVersion reads the deny-list version from agentmesh revoke's output.
func listVersion(t *testing.T, out string) uint64 {
	t.Helper()
	m := regexp.MustCompile(`version (\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no deny-list version in %q", out)
	}
	v, _ := strconv.ParseUint(m[1], 10, 64)
	return v
}

// metric reads one unlabelled gauge from the proxy admin port on h.
func metric(t *testing.T, h *lanHost, name string) float64 {
	t.Helper()
	return metricAt(t, h, "http://127.0.0.1:15020/metrics", name)
}

// adminMetricIn sums metric name (with labels) on the admin port of the proxy on h (0
// while there is no such sample).
func adminMetricIn(t *testing.T, h *lanHost, name string, labels ...string) float64 {
	t.Helper()
	url := "http://127.0.0.1:15020/metrics"
	v, err := sumMetric(url, h.mustRun(t, "curl", "-sS", "--max-time", "5", url), name, labels...)
	if err != nil && !errors.Is(err, errNoMetric) {
		t.Fatal(err)
	}
	return v
}

// metricAt reads one series (name, with its labels as exposed) from url on h.
func metricAt(t *testing.T, h *lanHost, url, name string) float64 {
	t.Helper()
	out := h.mustRun(t, "curl", "-sS", "--max-time", "5", url)
	for line := range strings.Lines(out) {
		if f := strings.Fields(line); len(f) == 2 && f[0] == name {
			v, err := strconv.ParseFloat(f[1], 64)
			if err == nil {
				return v
			}
		}
	}
	t.Fatalf("no metric %s", name)
	return math.NaN()
}

// victimTimes finds, in one proxy's audit records after since, the first handshake of
// the victim refused (on the victim's own proxy: the first handshake that failed, since
// it no longer presents the identity) and the last close of a connection with it that
// was live at since (on the victim's proxy: of any such connection).
func victimTimes(recs []map[string]any, victim string, onVictim bool, since time.Time) (refused, lastClosed time.Time, ok bool) {
	for _, r := range recs {
		ts, err := time.Parse(time.RFC3339Nano, fmt.Sprint(r["time"]))
		if err != nil || ts.Before(since) {
			continue
		}
		withVictim := onVictim || r["peer_id"] == victim
		switch {
		case r["type"] == "handshake" && r["result"] != "ok" && withVictim && (onVictim || r["reason"] == "revoked"):
			if refused.IsZero() {
				refused = ts
			}
		case r["type"] == "connection" && withVictim && openedBefore(r, ts, since):
			lastClosed = ts
		}
	}
	return refused, lastClosed, !refused.IsZero() && !lastClosed.IsZero()
}

// openedBefore reports whether the connection of record r, closed at closed, was
// already open at t: a live connection, not a later attempt that was refused.
func openedBefore(r map[string]any, closed, t time.Time) bool {
	d, ok := r["duration_ns"].(float64)
	return ok && closed.Add(-time.Duration(d)).Before(t)
}

// rogue is the test's own holder of an identity: a key in memory and an SVID. Its
// tunnels ask for port.
type rogue struct {
	client *meshclient.Client
	key    crypto.Signer
	svid   *x509svid.SVID
	roots  []*x509.Certificate
	port   uint16
}

func enrollAs(t *testing.T, authority *meshCA, id string) *rogue {
	t.Helper()
	tokFile := filepath.Join(t.TempDir(), "token")
	authority.token(t, id, tokFile)
	r, err := enrollWithToken(t, authority, id, strings.TrimSpace(string(readFile(t, tokFile))))
	if err != nil {
		t.Fatalf("enrol %s: %v", id, err)
	}
	return r
}

// enrollWithToken enrols id with the bootstrap token tok and a new key.
func enrollWithToken(t *testing.T, authority *meshCA, id, tok string) (*rogue, error) {
	t.Helper()
	roots, err := pemutil.ReadCertificateBundle(filepath.Join(authority.state, "root.crt"))
	if err != nil {
		t.Fatal(err)
	}
	client, err := meshclient.NewClient(meshclient.ClientConfig{URL: authority.url, Roots: roots,
		Token: func(context.Context) (string, error) { return tok, nil }})
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	r := &rogue{client: client, key: key, roots: roots, port: 8080}
	chain, err := client.Enroll(t.Context(), spiffeid.RequireFromString(id), key)
	if err != nil {
		return nil, err
	}
	r.svid = &x509svid.SVID{ID: spiffeid.RequireFromString(id), Certificates: chain, PrivateKey: key}
	return r, nil
}

func (r *rogue) renewErr(t *testing.T) error {
	chain, err := r.client.Renew(t.Context(), r.svid, r.key)
	if err == nil {
		r.svid = &x509svid.SVID{ID: r.svid.ID, Certificates: chain, PrivateKey: r.key}
	}
	return err
}

func (r *rogue) renew(t *testing.T) {
	t.Helper()
	if err := r.renewErr(t); err != nil {
		t.Fatalf("renew before the revocation: %v", err)
	}
}

// tunnel opens a tunnel to the proxy at addr, asks for r.port and makes one HTTP
// request through it; it reports whether the TLS session was resumed.
func (r *rogue) tunnel(t *testing.T, addr string, sessions tls.ClientSessionCache) bool {
	t.Helper()
	resumed, err := r.tunnelResumed(addr, sessions)
	if err != nil {
		t.Fatalf("tunnel to %s: %v", addr, err)
	}
	return resumed
}

func (r *rogue) tunnelErr(addr string, sessions tls.ClientSessionCache) error {
	_, err := r.tunnelResumed(addr, sessions)
	return err
}

func (r *rogue) tunnelResumed(addr string, sessions tls.ClientSessionCache) (bool, error) {
	cert := tls.Certificate{PrivateKey: r.key, Leaf: r.svid.Certificates[0]}
	for _, c := range r.svid.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		NextProtos:   []string{"agentmesh-tunnel/1"},
		// The test only needs the proxy to verify it; it trusts the address it dials.
		InsecureSkipVerify: true, //nolint:gosec,forbidigo // test client; see above
		ClientSessionCache: sessions,
	})
	if err != nil {
		return false, err
	}
	defer func() { _ = conn.Close() }() // what matters is the proxy's answer, read below
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	// Version-1 connect header (docs/tunnel.md), then a request.
	if _, err := conn.Write(endian.BigEndian.AppendUint16([]byte{'A', 'M', 'S', 'H', 1, 1}, r.port)); err != nil {
		return false, err
	}
	status := make([]byte, 1)
	if _, err := io.ReadFull(conn, status); err != nil {
		return false, fmt.Errorf("read status: %w", err)
	}
	if status[0] != 0 {
		return false, fmt.Errorf("tunnel status %d", status[0])
	}
	if _, err := io.WriteString(conn, "GET / HTTP/1.1\r\nHost: service\r\nConnection: close\r\n\r\n"); err != nil {
		return false, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return false, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return conn.ConnectionState().DidResume, nil
}

// fetchCRL returns the serials in the CA's CRL.
func fetchCRL(t *testing.T, authority *meshCA, r *rogue) []string {
	t.Helper()
	pool := x509.NewCertPool()
	for _, c := range r.roots {
		pool.AddCert(c)
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}
	resp, err := hc.Get(authority.url + "/1.0/crl")
	if err != nil {
		t.Fatalf("fetch CRL: %v", err)
	}
	defer resp.Body.Close()
	der, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("fetch CRL: status %d, %v", resp.StatusCode, err)
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		t.Fatalf("parse CRL: %v", err)
	}
	var serials []string
	for _, e := range crl.RevokedCertificateEntries {
		serials = append(serials, e.SerialNumber.String())
	}
	return serials
}

// routeLoad drives the routes: one goroutine per route opening a new connection per
// request, and one long-lived keep-alive connection per route.
type routeLoad struct {
	t    *testing.T
	ctx  context.Context
	stop context.CancelFunc
	wg   sync.WaitGroup
	mu   sync.Mutex
	res  map[string]*routeResult
	long map[string]*longConn
}

type routeResult struct{ ok, failed int }

func newRouteLoad(t *testing.T) *routeLoad {
	ctx, cancel := context.WithCancel(t.Context())
	l := &routeLoad{t: t, ctx: ctx, res: map[string]*routeResult{}, long: map[string]*longConn{}}
	l.stop = func() { cancel(); l.wg.Wait() }
	t.Cleanup(l.stop)
	return l
}

func (l *routeLoad) start(from, to, addr string) {
	key := from + "->" + to
	lc, err := dialLong(addr)
	if err != nil {
		l.t.Fatalf("long-lived connection %s: %v", key, err)
	}
	l.t.Cleanup(func() { lc.conn.Close() })
	l.long[key] = lc
	r := &routeResult{}
	l.res[key] = r
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	l.every(100*time.Millisecond, func() {
		err := get(l.ctx, hc, "http://"+addr+"/")
		if l.ctx.Err() != nil {
			return
		}
		l.mu.Lock()
		defer l.mu.Unlock()
		if err != nil {
			r.failed++
		} else {
			r.ok++
		}
	})
}

// rogue has r open a tunnel to addr every 20 ms until the load stops, resuming its
// session whenever the proxy lets it.
func (l *routeLoad) rogue(r *rogue, addr string) {
	sessions := tls.NewLRUClientSessionCache(1)
	l.every(20*time.Millisecond, func() { _ = r.tunnelErr(addr, sessions) })
}

// every runs f every interval until the load stops.
func (l *routeLoad) every(interval time.Duration, f func()) {
	l.wg.Go(func() {
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			select {
			case <-l.ctx.Done():
				return
			case <-tick.C:
			}
			f()
		}
	})
}

// total is the number of requests that succeeded so far, over every route.
func (l *routeLoad) total() map[string]int {
	out := map[string]int{}
	for k, r := range l.results() {
		out[k] = r.ok
	}
	return out
}

// awaitRequests waits until every route but those of the host except (none when "")
// has answered n more requests than it had in since (nil: from the start).
func (l *routeLoad) awaitRequests(t *testing.T, since map[string]int, n int, except string) {
	t.Helper()
	waitFor(t, 60*time.Second, fmt.Sprintf("%d more requests on every route", n), func() error {
		for k, r := range l.results() {
			if except != "" && strings.Contains(k, except) {
				continue
			}
			if r.ok < since[k]+n {
				return fmt.Errorf("route %s: %d requests answered", k, r.ok)
			}
		}
		return nil
	})
}

func (l *routeLoad) results() map[string]routeResult {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string]routeResult{}
	for k, r := range l.res {
		out[k] = *r
	}
	return out
}

func get(ctx context.Context, hc *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, err = io.Copy(io.Discard, resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("status %d", resp.StatusCode)
	}
	return err
}

// longConn is one keep-alive HTTP connection through a route.
type longConn struct {
	conn net.Conn
	rd   *bufio.Reader
}

func dialLong(addr string) (*longConn, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	lc := &longConn{conn: conn, rd: bufio.NewReader(conn)}
	if err := lc.request(); err != nil {
		conn.Close()
		return nil, err
	}
	return lc, nil
}

func (lc *longConn) request() error {
	_ = lc.conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(lc.conn, "GET / HTTP/1.1\r\nHost: service\r\n\r\n"); err != nil {
		return err
	}
	resp, err := http.ReadResponse(lc.rd, nil)
	if err != nil {
		return err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return err
}

// alive reports whether the connection still carries a request.
func (lc *longConn) alive() bool { return lc.request() == nil }
