package ca

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"math/big"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/internal/testrun"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"
)

// runDirectory starts d.Run; the returned stop cancels it and waits for it to return
// (also run at cleanup).
func runDirectory(t *testing.T, d *meshclient.Member) (stop func()) {
	t.Helper()
	return testrun.Start(t, d.Run)
}

// newProxyDirectory is the directory client of a proxy holding svid.
func newProxyDirectory(t *testing.T, ca *runningCA, svid *x509svid.SVID, port uint16, heartbeat time.Duration, beat func(), a ...string) *meshclient.Member {
	t.Helper()
	logger, _ := newTestLogger(t)
	cert := tlsCert(svid)
	cfg := meshclient.Config{
		URL:         ca.URL(),
		Roots:       ca.Roots(),
		Certificate: func() (*tls.Certificate, error) { return cert, nil },
		Addresses:   addrs(a...),
		TunnelPort:  port,
		Heartbeat:   heartbeat,
		Logger:      logger.With("proxy", svid.ID.String()),
	}
	if beat != nil {
		cfg.BundleVersion = func() string { beat(); return "1" }
	}
	d, err := meshclient.NewMember(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// waitUntil waits on d's notifications until cond holds; the deadline is a guard
// against a hang (well under a 25s long-poll, so a pass means a woken poll).
func waitUntil(t *testing.T, d *meshclient.Member, what string, cond func() bool) {
	t.Helper()
	guard := time.NewTimer(10 * time.Second)
	defer guard.Stop()
	for !cond() {
		select {
		case <-d.Watch.Updated():
		case <-guard.C:
			t.Fatalf("%s: not within 10s (directory version %d)", what, d.Watch.State().Version())
		}
	}
}

func registerBody(port int, a ...string) meshapi.RegisterRequest {
	return meshapi.RegisterRequest{Addresses: a, TunnelPort: port, Transports: []string{"tls"}}
}

func decodeJSON[T any](t *testing.T, b []byte) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	return v
}

func peerIDs(doc meshapi.DirectoryDocument) []string {
	var ids []string
	for _, p := range doc.Peers {
		ids = append(ids, p.SPIFFEID.String())
	}
	return ids
}

// The mesh directory end to end on a real CA with real SVIDs: long-poll wake-up,
// no-op heartbeats, two proxies finding each other, one address one proxy, only hosts
// register, and expiry after the TTL.
func TestMeshDirectory(t *testing.T) {
	cfg, logs := testConfig(t)
	cfg.DirectoryTTL = 2 * time.Second
	parked := make(chan struct{}, 1)
	ca := startCAWith(t, cfg, func(s *Server) {
		s.dir.testHookWaiting = func() {
			select {
			case parked <- struct{}{}:
			default:
			}
		}
	})
	idC := spiffeid.RequireFromPath(testTD, "/host/c")
	svidA := enroll(t, ca, idA)
	svidB := enroll(t, ca, idB)
	svidC := enroll(t, ca, idC)
	agent := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/agent/x"))
	hcC := httpsClient(t, ca, tlsCert(svidC))
	dirURL := ca.URL() + meshapi.Prefix + meshapi.DirectoryPath
	regURL := ca.URL() + meshapi.Prefix + meshapi.RegisterPath

	var v1 uint64
	t.Run("watcher parked in a long-poll is woken by a registration", func(t *testing.T) {
		status, body := do(t, hcC, http.MethodGet, dirURL+"?wait=0s", nil)
		if status != http.StatusOK {
			t.Fatalf("GET directory: %d %s", status, body)
		}
		v0 := decodeJSON[meshapi.DirectoryDocument](t, body).Version
		select { // drop a stray signal, if any
		case <-parked:
		default:
		}
		type answer struct {
			doc     meshapi.DirectoryDocument
			elapsed time.Duration
		}
		answers := make(chan answer, 1)
		go func() { // no t.Fatal here: not the test's goroutine
			start := time.Now()
			var doc meshapi.DirectoryDocument
			resp, err := hcC.Get(dirURL + "?since=" + strconv.FormatUint(v0, 10) + "&wait=20s")
			if err == nil {
				err = json.NewDecoder(resp.Body).Decode(&doc)
				_ = resp.Body.Close()
			}
			if err != nil {
				t.Errorf("long-poll: %v", err)
			}
			answers <- answer{doc, time.Since(start)}
		}()
		<-parked
		status, body = do(t, hcC, http.MethodPost, regURL, registerBody(15008, "10.0.0.3"))
		if status != http.StatusOK {
			t.Fatalf("register: %d %s", status, body)
		}
		resp := decodeJSON[meshapi.RegisterResponse](t, body)
		v1 = resp.Version
		if v1 <= v0 || resp.Peer.SPIFFEID != idC {
			t.Fatalf("register answer %+v, version before %d", resp, v0)
		}
		a := <-answers
		if a.doc.Version != v1 || len(a.doc.Peers) != 1 || a.doc.Peers[0].SPIFFEID != idC || a.elapsed >= 20*time.Second {
			t.Fatalf("long-poll answered %+v after %v, want version %d with host/c", a.doc, a.elapsed, v1)
		}
		t.Logf("long-poll woken %v after it started", a.elapsed)

		// Nothing changes: the wait runs out and the answer carries the same version.
		start := time.Now()
		status, body = do(t, hcC, http.MethodGet, dirURL+"?since="+strconv.FormatUint(v1, 10)+"&wait=300ms", nil)
		if got := decodeJSON[meshapi.DirectoryDocument](t, body).Version; status != http.StatusOK || got != v1 || time.Since(start) < 300*time.Millisecond {
			t.Fatalf("unchanged long-poll: %d version %d after %v, want %d after 300ms", status, got, time.Since(start), v1)
		}
	})

	t.Run("a heartbeat that changes nothing keeps the version", func(t *testing.T) {
		before, err := RequestDirectory(context.Background(), cfg.StateDir)
		if err != nil {
			t.Fatalf("RequestDirectory: %v", err)
		}
		status, body := do(t, hcC, http.MethodPost, regURL, registerBody(15008, "10.0.0.3"))
		if got := decodeJSON[meshapi.RegisterResponse](t, body).Version; status != http.StatusOK || got != v1 {
			t.Fatalf("heartbeat: %d version %d, want %d", status, got, v1)
		}
		after, err := RequestDirectory(context.Background(), cfg.StateDir)
		if err != nil {
			t.Fatal(err)
		}
		if after.Version != v1 || !after.Peers[0].LastHeartbeat.After(before.Peers[0].LastHeartbeat) {
			t.Errorf("after a heartbeat: version %d (want %d), last heartbeat %v -> %v",
				after.Version, v1, before.Peers[0].LastHeartbeat, after.Peers[0].LastHeartbeat)
		}
		status, body = do(t, hcC, http.MethodPost, regURL, registerBody(15009, "10.0.0.3"))
		if got := decodeJSON[meshapi.RegisterResponse](t, body).Version; status != http.StatusOK || got <= v1 {
			t.Fatalf("port change: %d version %d, want > %d", status, got, v1)
		}
	})

	beatsA, beatsB := make(chan struct{}, 1), make(chan struct{}, 1)
	signal := func(ch chan struct{}) func() {
		return func() {
			select {
			case ch <- struct{}{}:
			default:
			}
		}
	}
	const heartbeat = 100 * time.Millisecond
	a := newProxyDirectory(t, ca, svidA, 15008, heartbeat, signal(beatsA), "10.0.0.1", "fd00::1")
	b := newProxyDirectory(t, ca, svidB, 15009, heartbeat, signal(beatsB), "10.0.0.2", "fd00::2")
	runDirectory(t, a)
	stopB := runDirectory(t, b)

	t.Run("two proxies see each other but not themselves", func(t *testing.T) {
		waitUntil(t, a, "a sees b", func() bool { _, _, ok := a.Watch.State().PeerFor(netip.MustParseAddr("10.0.0.2")); return ok })
		waitUntil(t, b, "b sees a", func() bool { _, _, ok := b.Watch.State().PeerFor(netip.MustParseAddr("fd00::1")); return ok })
		for _, tc := range []struct {
			d      *meshclient.Member
			addr   string
			id     spiffeid.ID
			tunnel string
		}{
			{a, "10.0.0.2", idB, "10.0.0.2:15009"},
			{a, "fd00::2", idB, "[fd00::2]:15009"},
			{a, "::ffff:10.0.0.2", idB, "10.0.0.2:15009"},
			{b, "10.0.0.1", idA, "10.0.0.1:15008"},
			{b, "fd00::1", idA, "[fd00::1]:15008"},
		} {
			id, tunnel, ok := tc.d.Watch.State().PeerFor(netip.MustParseAddr(tc.addr))
			if ok && !slices.Equal(tc.d.Watch.State().TransportsFor(netip.MustParseAddr(tc.addr)), []string{"tls"}) {
				t.Errorf("TransportsFor(%s) = %v, want the default [tls]", tc.addr, tc.d.Watch.State().TransportsFor(netip.MustParseAddr(tc.addr)))
			}
			if !ok || id != tc.id || tunnel != tc.tunnel {
				t.Errorf("PeerFor(%s) = %v %q %v, want %v %q", tc.addr, id, tunnel, ok, tc.id, tc.tunnel)
			}
		}
		for _, own := range []struct {
			d    *meshclient.Member
			addr string
		}{{a, "10.0.0.1"}, {a, "fd00::1"}, {b, "10.0.0.2"}, {b, "fd00::2"}} {
			if id, _, ok := own.d.Watch.State().PeerFor(netip.MustParseAddr(own.addr)); ok {
				t.Errorf("PeerFor(%s) returned the proxy's own entry %v", own.addr, id)
			}
		}
		if _, _, ok := a.Watch.State().PeerFor(netip.MustParseAddr("10.9.9.9")); ok {
			t.Error("PeerFor of an unregistered address")
		}
	})

	t.Run("an address registered by another live proxy is refused", func(t *testing.T) {
		status, body := do(t, hcC, http.MethodPost, regURL, registerBody(15008, "10.0.0.3", "10.0.0.1"))
		if status != http.StatusConflict {
			t.Fatalf("claiming a's address: %d %s, want 409", status, body)
		}
		// a's first registration made 10.0.0.1 its claim: refused before the directory.
		if !strings.Contains(logs.String(), "address claim refused") || !strings.Contains(logs.String(), "claimed_by=spiffe://mesh.test/host/a") {
			t.Error("the conflict is not logged")
		}
		if id, _, ok := b.Watch.State().PeerFor(netip.MustParseAddr("10.0.0.1")); !ok || id != idA {
			t.Errorf("after the refused claim, 10.0.0.1 maps to %v %v", id, ok)
		}
	})

	t.Run("only host identities register", func(t *testing.T) {
		hc := httpsClient(t, ca, tlsCert(agent))
		status, body := do(t, hc, http.MethodPost, regURL, registerBody(15008, "10.0.0.7"))
		if status != http.StatusForbidden {
			t.Fatalf("agent registration: %d %s, want 403", status, body)
		}
		if status, body := do(t, hc, http.MethodGet, dirURL+"?wait=0s", nil); status != http.StatusOK {
			t.Errorf("agent reading the directory: %d %s, want 200", status, body)
		}
	})

	t.Run("heartbeats of a settled mesh keep the version", func(t *testing.T) {
		// host/c was registered by hand and is no longer refreshed: wait until its
		// expiry has come and gone, then count heartbeats.
		waitUntil(t, a, "host/c expires", func() bool {
			doc, err := RequestDirectory(context.Background(), cfg.StateDir)
			return err == nil && len(doc.Peers) == 2
		})
		v := a.Watch.State().Version()
		// Heartbeats are sequential: after five starts, at least three have completed
		// (the first signal may be an old one).
		for range 5 {
			<-beatsA
			<-beatsB
		}
		doc, err := RequestDirectory(context.Background(), cfg.StateDir)
		if err != nil {
			t.Fatal(err)
		}
		if doc.Version != v || a.Watch.State().Version() != v || b.Watch.State().Version() != v {
			t.Errorf("versions moved with heartbeats only: ca %d, a %d, b %d, was %d", doc.Version, a.Watch.State().Version(), b.Watch.State().Version(), v)
		}
		if got := strings.Join(peerIDs(*doc), " "); got != idA.String()+" "+idB.String() {
			t.Errorf("directory holds %s", got)
		}
	})

	t.Run("a proxy that stops heartbeating disappears after the ttl", func(t *testing.T) {
		stopB()
		stopped := time.Now()
		// b's last heartbeat, as the CA recorded it: no other can follow.
		var last time.Time
		doc, err := RequestDirectory(context.Background(), cfg.StateDir)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range doc.Peers {
			if p.SPIFFEID == idB {
				last = p.LastHeartbeat
			}
		}
		waitUntil(t, a, "b expires", func() bool { _, _, ok := a.Watch.State().PeerFor(netip.MustParseAddr("10.0.0.2")); return !ok })
		t.Logf("b dropped %v after its Run stopped, %v after its last heartbeat (ttl %v, heartbeat %v)",
			time.Since(stopped), time.Since(last), cfg.DirectoryTTL, heartbeat)
		if !last.IsZero() && time.Since(last) < cfg.DirectoryTTL {
			t.Errorf("b dropped %v after its last heartbeat, before its ttl of %v", time.Since(last), cfg.DirectoryTTL)
		}
		if _, _, ok := a.Watch.State().PeerFor(netip.MustParseAddr("fd00::2")); ok {
			t.Error("b's second address is still listed")
		}
		doc, err = RequestDirectory(context.Background(), cfg.StateDir)
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Join(peerIDs(*doc), " "); got != idA.String() {
			t.Errorf("directory holds %s, want only host/a", got)
		}
		if !strings.Contains(logs.String(), "directory peer expired") {
			t.Error("the expiry is not logged")
		}
	})
}

// The mesh API admits valid X509-SVIDs of the trust domain only, and well-formed
// requests only.
func TestMeshAPIRefusals(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	host := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/host/h"))
	agent := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/agent/x"))
	dirURL := ca.URL() + meshapi.Prefix + meshapi.DirectoryPath
	regURL := ca.URL() + meshapi.Prefix + meshapi.RegisterPath

	// A CA of its own claiming the same trust domain, and one of another.
	foreignSame := foreignSVID(t, testTD, "/host/h")
	foreignOther := foreignSVID(t, spiffeid.RequireTrustDomainFromString("evil.test"), "/host/h")
	leafOnly := tlsCert(host)
	leafOnly.Certificate = leafOnly.Certificate[:1] // the server supplies its intermediate

	for _, tc := range []struct {
		name   string
		cert   *tls.Certificate
		method string
		url    string
		body   any
		status int
	}{
		{"no client certificate: register", nil, http.MethodPost, regURL, registerBody(15008, "10.0.0.1"), http.StatusUnauthorized},
		{"no client certificate: directory", nil, http.MethodGet, dirURL, nil, http.StatusUnauthorized},
		{"foreign CA, same trust domain: register", foreignSame, http.MethodPost, regURL, registerBody(15008, "10.0.0.1"), http.StatusUnauthorized},
		{"foreign CA, same trust domain: directory", foreignSame, http.MethodGet, dirURL, nil, http.StatusUnauthorized},
		{"foreign CA, other trust domain: directory", foreignOther, http.MethodGet, dirURL + "?wait=0s", nil, http.StatusUnauthorized},
		{"agent: register", tlsCert(agent), http.MethodPost, regURL, registerBody(15008, "10.0.0.1"), http.StatusForbidden},
		{"host without intermediate: directory", leafOnly, http.MethodGet, dirURL + "?wait=0s", nil, http.StatusOK},
		{"unknown field", tlsCert(host), http.MethodPost, regURL, map[string]any{"addresses": []string{"10.0.0.1"}, "tunnel_port": 1, "spiffe_id": "spiffe://mesh.test/host/other"}, http.StatusBadRequest},
		{"host name", tlsCert(host), http.MethodPost, regURL, registerBody(15008, "host-h.mesh.test"), http.StatusBadRequest},
		{"port 0", tlsCert(host), http.MethodPost, regURL, registerBody(0, "10.0.0.1"), http.StatusBadRequest},
		{"port 65536", tlsCert(host), http.MethodPost, regURL, registerBody(65536, "10.0.0.1"), http.StatusBadRequest},
		{"body over 64 KiB", tlsCert(host), http.MethodPost, regURL, map[string]any{"addresses": []string{"10.0.0.1"}, "tunnel_port": 1, "bundle_version": strings.Repeat("v", 65<<10)}, http.StatusBadRequest},
		{"since not a number", tlsCert(host), http.MethodGet, dirURL + "?since=x", nil, http.StatusBadRequest},
		{"negative wait", tlsCert(host), http.MethodGet, dirURL + "?wait=-1s", nil, http.StatusBadRequest},
		{"wrong method", tlsCert(host), http.MethodGet, regURL, nil, http.StatusMethodNotAllowed},
		{"valid registration", tlsCert(host), http.MethodPost, regURL, registerBody(15008, "10.0.0.1"), http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			status, body := do(t, httpsClient(t, ca, tc.cert), tc.method, tc.url, tc.body)
			if status != tc.status {
				t.Fatalf("%s %s: %d %s, want %d", tc.method, tc.url, status, body, tc.status)
			}
		})
	}

	// A Directory whose identity may not register keeps retrying (never exits) and
	// the refusal is a permanent meshapi.ResponseError.
	d := newProxyDirectory(t, ca, agent, 15008, 50*time.Millisecond, nil, "10.0.0.8")
	_, err := d.Heartbeat.Register(context.Background())
	var re *meshapi.ResponseError
	if !errors.As(err, &re) || re.Status != http.StatusForbidden || !re.Permanent() || re.Op != "register" {
		t.Fatalf("agent register: %v, want a permanent 403", err)
	}
}

// Stopping the CA answers parked long-polls at once instead of holding the graceful
// shutdown until its timeout.
func TestMeshShutdownAnswersLongPolls(t *testing.T) {
	cfg, _ := testConfig(t)
	parked := make(chan struct{}, 1)
	ca := startCAWith(t, cfg, func(s *Server) {
		s.dir.testHookWaiting = func() {
			select {
			case parked <- struct{}{}:
			default:
			}
		}
	})
	hc := httpsClient(t, ca, tlsCert(enroll(t, ca, spiffeid.RequireFromPath(testTD, "/host/h"))))
	dirURL := ca.URL() + meshapi.Prefix + meshapi.DirectoryPath
	_, body := do(t, hc, http.MethodGet, dirURL+"?wait=0s", nil)
	v := decodeJSON[meshapi.DirectoryDocument](t, body).Version
	statuses := make(chan int, 1)
	go func() {
		resp, err := hc.Get(dirURL + "?wait=60s&since=" + strconv.FormatUint(v, 10))
		if err != nil {
			t.Errorf("parked long-poll: %v", err)
			statuses <- 0
			return
		}
		_ = resp.Body.Close()
		statuses <- resp.StatusCode
	}()
	<-parked
	start := time.Now()
	if err := ca.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	if d := time.Since(start); d >= shutdownTimeout {
		t.Errorf("shutdown took %v: the long-poll held it up", d)
	}
	if status := <-statuses; status != http.StatusOK {
		t.Errorf("parked long-poll answered %d at shutdown, want 200", status)
	}
}

// foreignSVID is an X509-SVID for path in td issued by a CA that is not ours (its own
// root, with the SPIFFE name constraints of a real one).
func foreignSVID(t *testing.T, td spiffeid.TrustDomain, path string) *tls.Certificate {
	t.Helper()
	caKey := newKey(t)
	root := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(time.Hour),
		URIs:                  []*url.URL{td.ID().URL()},
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	rootDER, err := x509.CreateCertificate(rand.Reader, root, root, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	rootCert, err := x509.ParseCertificate(rootDER)
	if err != nil {
		t.Fatal(err)
	}
	key := newKey(t)
	leaf := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		URIs:         []*url.URL{spiffeid.RequireFromPath(td, path).URL()},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, rootCert, key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Certificate{Certificate: [][]byte{leafDER, rootDER}, PrivateKey: key}
}
