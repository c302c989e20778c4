package meshclient

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestDecodeDirectory(t *testing.T) {
	t.Parallel()
	self := spiffeid.RequireFromPath(testTD, "/host/self")
	for _, tc := range []struct {
		name    string
		doc     string
		version uint64
		routes  map[string]string // address -> "id tunnel"; nil: refused
	}{
		{
			name:    "two peers",
			doc:     `{"version":7,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["10.0.0.1","fd00::1"],"tunnel_port":15008,"transports":["tls"]},{"spiffe_id":"spiffe://mesh.test/host/b","addresses":["10.0.0.2"],"tunnel_port":15009,"transports":["tls"]}]}`,
			version: 7,
			routes: map[string]string{
				"10.0.0.1": "spiffe://mesh.test/host/a 10.0.0.1:15008",
				"fd00::1":  "spiffe://mesh.test/host/a [fd00::1]:15008",
				"10.0.0.2": "spiffe://mesh.test/host/b 10.0.0.2:15009",
			},
		},
		{
			name:    "own entry left out",
			doc:     `{"version":3,"peers":[{"spiffe_id":"spiffe://mesh.test/host/self","addresses":["10.0.0.9"],"tunnel_port":15008,"transports":["tls"]}]}`,
			version: 3,
			routes:  map[string]string{},
		},
		{
			name:    "empty directory",
			doc:     `{"version":1,"peers":[]}`,
			version: 1,
			routes:  map[string]string{},
		},
		{
			name:    "unknown sections ignored",
			doc:     `{"version":2,"peers":null,"bundle":{"version":9},"future":[1]}`,
			version: 2,
			routes:  map[string]string{},
		},
		{
			name:    "mapped address unmapped",
			doc:     `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["::ffff:10.0.0.1"],"tunnel_port":1}]}`,
			version: 2,
			routes:  map[string]string{"10.0.0.1": "spiffe://mesh.test/host/a 10.0.0.1:1"},
		},
		{name: "no version", doc: `{"peers":[]}`},
		{name: "not json", doc: `<html>`},
		{name: "truncated", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a"`},
		{name: "version not a number", doc: `{"version":"2","peers":[]}`},
		{name: "negative version", doc: `{"version":-2,"peers":[]}`},
		{name: "no id", doc: `{"version":2,"peers":[{"addresses":["10.0.0.1"],"tunnel_port":1}]}`},
		{name: "bad id", doc: `{"version":2,"peers":[{"spiffe_id":"https://mesh.test/host/a","addresses":["10.0.0.1"],"tunnel_port":1}]}`},
		{name: "no port", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["10.0.0.1"]}]}`},
		{name: "port out of range", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["10.0.0.1"],"tunnel_port":65536}]}`},
		{name: "no addresses", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":[],"tunnel_port":1}]}`},
		{name: "empty address", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":[""],"tunnel_port":1}]}`},
		{name: "zoned address", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["fe80::1%eth0"],"tunnel_port":1}]}`},
		{name: "unspecified address", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["0.0.0.0"],"tunnel_port":1}]}`},
		{name: "address listed twice", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["10.0.0.1"],"tunnel_port":1},{"spiffe_id":"spiffe://mesh.test/host/b","addresses":["::ffff:10.0.0.1"],"tunnel_port":1}]}`},
		{name: "malformed own entry", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/self","addresses":[],"tunnel_port":1}]}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			snap, err := decodeDirectory([]byte(tc.doc), self)
			if tc.routes == nil {
				if err == nil {
					t.Fatalf("accepted: %+v", snap)
				}
				t.Logf("refused: %v", err)
				return
			}
			if err != nil {
				t.Fatalf("refused: %v", err)
			}
			if snap.version != tc.version || len(snap.peers) != len(tc.routes) {
				t.Fatalf("version %d, %d routes; want %d, %d", snap.version, len(snap.peers), tc.version, len(tc.routes))
			}
			for a, want := range tc.routes {
				r, ok := snap.peers[netip.MustParseAddr(a)]
				if got := r.id.String() + " " + r.tunnel; !ok || got != want {
					t.Errorf("%s: %q (%v), want %q", a, got, ok, want)
				}
			}
		})
	}
}

// FuzzDirectoryResponse: directory answers from the network never panic the decoder,
// and an accepted one yields only well-formed routes to other proxies.
func FuzzDirectoryResponse(f *testing.F) {
	self := spiffeid.RequireFromPath(testTD, "/host/self")
	f.Fuzz(func(t *testing.T, b []byte) {
		snap, err := decodeDirectory(b, self)
		if err != nil {
			return
		}
		if snap.version == 0 {
			t.Fatal("accepted version 0")
		}
		for a, r := range snap.peers {
			if !a.IsValid() || a.Is4In6() || a.Zone() != "" {
				t.Fatalf("route for address %v", a)
			}
			if r.id.IsZero() || r.id == self {
				t.Fatalf("route to %q", r.id)
			}
			host, port, err := net.SplitHostPort(r.tunnel)
			if err != nil || host != a.String() {
				t.Fatalf("tunnel %q for %v: %v", r.tunnel, a, err)
			}
			if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
				t.Fatalf("tunnel port %q", port)
			}
		}
		for a, agents := range snap.agents {
			if !a.IsValid() || a.Is4In6() || a.Zone() != "" || len(agents) == 0 {
				t.Fatalf("agents %v for address %v", agents, a)
			}
			for port, id := range agents {
				if port == 0 || id.IsZero() {
					t.Fatalf("agent %q at port %d of %v", id, port, a)
				}
			}
		}
		for i, e := range snap.entries {
			if e.ID.IsZero() || e.Host.IsZero() || (i > 0 && compareEntries(snap.entries[i-1], e) >= 0) {
				t.Fatalf("entries %+v", snap.entries)
			}
		}
	})
}

// The seed corpus parses as the fuzz target expects: one document per file.
func TestDirectoryFuzzSeeds(t *testing.T) {
	t.Parallel()
	files, err := filepath.Glob(filepath.Join("testdata", "fuzz", "FuzzDirectoryResponse", "*"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no seeds: %v", err)
	}
	accepted := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := decodeDirectory(corpusBytes(t, b), spiffeid.ID{}); err == nil {
			accepted++
		}
	}
	if accepted == 0 {
		t.Error("no seed is a valid directory")
	}
}

func TestRetryDelay(t *testing.T) {
	t.Parallel()
	const base, maxDelay = 500 * time.Millisecond, 10 * time.Second
	for _, tc := range []struct {
		name    string
		attempt int
		r       float64
		want    time.Duration
	}{
		{"first, no jitter draw", 1, 0, 0},
		{"first, top of range", 1, 0.999999, 499999500 * time.Nanosecond},
		{"first, half", 1, 0.5, 250 * time.Millisecond},
		{"second doubles", 2, 0.5, 500 * time.Millisecond},
		{"fifth", 5, 0.5, 4 * time.Second},
		{"capped", 6, 0.5, 5 * time.Second},
		{"far past the cap", 1000, 0.5, 5 * time.Second},
		{"shift overflow", 64, 1, maxDelay},
		{"attempt 0 treated as 1", 0, 0.5, 250 * time.Millisecond},
	} {
		if got := retryDelay(tc.attempt, base, maxDelay, tc.r); got != tc.want {
			t.Errorf("%s: retryDelay(%d, r=%v) = %v, want %v", tc.name, tc.attempt, tc.r, got, tc.want)
		}
	}
}

func TestHeartbeatDelay(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		interval time.Duration
		r        float64
		want     time.Duration
	}{
		{"no jitter", 10 * time.Second, 0, 10 * time.Second},
		{"half jitter", 10 * time.Second, 0.5, 9500 * time.Millisecond},
		{"max jitter stays above 90%", 10 * time.Second, 0.999999, 9000001 * time.Microsecond},
		{"short interval", 100 * time.Millisecond, 0.5, 95 * time.Millisecond},
	} {
		if got := heartbeatDelay(tc.interval, tc.r); got != tc.want {
			t.Errorf("%s: heartbeatDelay(%v, %v) = %v, want %v", tc.name, tc.interval, tc.r, got, tc.want)
		}
	}
}

func TestNewDirectoryValidates(t *testing.T) {
	t.Parallel()
	cert := func() (*tls.Certificate, error) { return nil, errors.New("none") }
	valid := DirectoryConfig{
		URL: "https://ca.mesh.test:9443", Roots: []*x509.Certificate{{}}, Certificate: cert,
		Addresses: addrs("10.0.0.1"), TunnelPort: 15008,
	}
	tooMany := make([]netip.Addr, maxAddresses+1)
	for i := range tooMany {
		tooMany[i] = netip.AddrFrom4([4]byte{10, 0, 1, byte(i)})
	}
	for _, tc := range []struct {
		name      string
		mutate    func(*DirectoryConfig)
		ok        bool
		watchOnly bool
	}{
		{"valid", func(*DirectoryConfig) {}, true, false},
		{"mapped and duplicate addresses", func(c *DirectoryConfig) { c.Addresses = addrs("::ffff:10.0.0.1", "10.0.0.1") }, true, false},
		{"no addresses: watch only", func(c *DirectoryConfig) { c.Addresses = nil }, true, true},
		{"watch only needs no tunnel port", func(c *DirectoryConfig) { c.Addresses, c.TunnelPort = nil, 0 }, true, true},
		{"http", func(c *DirectoryConfig) { c.URL = "http://ca.mesh.test:9443" }, false, false},
		{"no roots", func(c *DirectoryConfig) { c.Roots = nil }, false, false},
		{"no certificate source", func(c *DirectoryConfig) { c.Certificate = nil }, false, false},
		{"too many addresses", func(c *DirectoryConfig) { c.Addresses = tooMany }, false, false},
		{"zero address", func(c *DirectoryConfig) { c.Addresses = []netip.Addr{{}} }, false, false},
		{"unspecified address", func(c *DirectoryConfig) { c.Addresses = addrs("0.0.0.0") }, false, false},
		{"zoned address", func(c *DirectoryConfig) { c.Addresses = addrs("fe80::1%eth0") }, false, false},
		{"no tunnel port", func(c *DirectoryConfig) { c.TunnelPort = 0 }, false, false},
		{"negative heartbeat", func(c *DirectoryConfig) { c.Heartbeat = -time.Second }, false, false},
		{"negative poll interval", func(c *DirectoryConfig) { c.PollInterval = -time.Second }, false, false},
		{"bad transport", func(c *DirectoryConfig) { c.Transports = []string{"TLS 1.3"} }, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := valid
			tc.mutate(&cfg)
			d, err := NewDirectory(cfg)
			if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrInvalidConfig)) {
				t.Fatalf("NewDirectory = %v", err)
			}
			if d != nil {
				if _, _, ok := d.PeerFor(netip.MustParseAddr("10.0.0.2")); ok || d.Version() != 0 {
					t.Error("a new Directory knows peers")
				}
				if d.DenyList() != nil || d.CheckFresh(time.Minute) != nil {
					t.Error("a new Directory holds a deny-list, or is not fresh")
				}
				switch {
				case tc.watchOnly && len(d.body.Addresses) != 0:
					t.Errorf("watch-only register body %+v", d.body)
				case !tc.watchOnly && (len(d.body.Addresses) != 1 || d.body.Addresses[0] != "10.0.0.1" || d.body.Transports[0] != "tls"):
					t.Errorf("register body %+v", d.body)
				}
			}
		})
	}
}

// selfSignedSVID is an X509-SVID for id signed by its own key: enough for a fake CA
// that only reads the ID.
func selfSignedSVID(t *testing.T, id spiffeid.ID) *tls.Certificate {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		URIs:         []*url.URL{id.URL()},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// awaitUpdate waits for the next notification of d, failing the test after a
// generous bound (a guard, not synchronisation).
func awaitUpdate(t *testing.T, d *Directory) {
	t.Helper()
	select {
	case <-d.Updated():
	case <-time.After(15 * time.Second):
		t.Fatalf("no directory update (version %d)", d.Version())
	}
}

// Against a scripted CA: the client retries while it has no certificate (calling
// Certificate for each attempt), applies newer versions, refuses an older one
// without touching what it holds, and keeps going after it. The CA is a fake only
// because the real one cannot be made to answer with an older version.
func TestDirectoryNeverRollsBack(t *testing.T) {
	t.Parallel()
	self := spiffeid.RequireFromPath(testTD, "/host/self")
	peer := func(v uint64, name, addr string) string {
		return fmt.Sprintf(`{"version":%d,"peers":[{"spiffe_id":"spiffe://mesh.test/host/self","addresses":["10.0.0.9"],"tunnel_port":1},{"spiffe_id":"spiffe://mesh.test/host/%s","addresses":["%s"],"tunnel_port":15008,"transports":["tls"]}]}`, v, name, addr)
	}
	script := []string{peer(10, "a", "10.0.0.1"), peer(5, "old", "10.0.0.5"), peer(11, "b", "10.0.0.2")}
	var polls atomic.Int32
	release := make(chan struct{})       // lets version 11 out
	registered := make(chan struct{}, 1) // a registration was answered
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if len(r.TLS.PeerCertificates) == 0 || r.TLS.PeerCertificates[0].URIs[0].String() != self.String() {
			writeStepError(w, http.StatusUnauthorized, "no client certificate")
			return
		}
		switch r.URL.Path {
		case meshPrefix + meshRegisterPath:
			var req registerRequest
			if err := decodeStrict(r.Body, &req); err != nil || req.TunnelPort != 15008 || req.BundleVersion != "b1" {
				writeStepError(w, http.StatusBadRequest, fmt.Sprintf("%+v %v", req, err))
				return
			}
			writeJSON(w, registerResponse{Version: 10})
			select {
			case registered <- struct{}{}:
			default:
			}
		case meshPrefix + meshDirectoryPath:
			n := int(polls.Add(1)) - 1
			if n == 2 {
				select {
				case <-release:
				case <-r.Context().Done():
					return
				}
			}
			if n >= len(script) {
				<-r.Context().Done() // park like an unchanged long-poll
				return
			}
			_, _ = w.Write([]byte(script[n]))
		default:
			http.NotFound(w, r)
		}
	}))
	srv.TLS = &tls.Config{ClientAuth: tls.RequestClientCert}
	// Handshakes the client aborts (no certificate yet) are expected here.
	srv.Config.ErrorLog = slog.NewLogLogger(slog.DiscardHandler, slog.LevelError)
	srv.StartTLS()
	t.Cleanup(srv.Close)

	svid := selfSignedSVID(t, self)
	var ready atomic.Bool
	failures := make(chan struct{}, 16)
	logger, logs := newTestLogger(t)
	d, err := NewDirectory(DirectoryConfig{
		URL:   srv.URL,
		Roots: []*x509.Certificate{srv.Certificate()},
		Certificate: func() (*tls.Certificate, error) {
			if !ready.Load() {
				select {
				case failures <- struct{}{}:
				default:
				}
				return nil, errors.New("no valid svid yet")
			}
			return svid, nil
		},
		Addresses:     addrs("10.0.0.9"),
		TunnelPort:    15008,
		BundleVersion: func() string { return "b1" },
		Heartbeat:     50 * time.Millisecond,
		Logger:        logger,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	// Retried while the certificate is missing, then it hot-swaps in.
	for range 3 {
		<-failures
	}
	ready.Store(true)

	awaitUpdate(t, d)
	if d.Version() != 10 {
		t.Fatalf("version %d, want 10", d.Version())
	}
	if err := d.Run(ctx); !errors.Is(err, ErrDirectoryRunning) {
		t.Errorf("second concurrent Run: %v, want ErrDirectoryRunning", err)
	}
	if id, tunnel, ok := d.PeerFor(netip.MustParseAddr("10.0.0.1")); !ok || id.String() != "spiffe://mesh.test/host/a" || tunnel != "10.0.0.1:15008" {
		t.Fatalf("PeerFor(a) = %v %q %v", id, tunnel, ok)
	}
	if _, _, ok := d.PeerFor(netip.MustParseAddr("10.0.0.9")); ok {
		t.Error("PeerFor returned this proxy's own entry")
	}

	// Version 5 is refused; 11 is applied next. The refused document's peer never
	// shows.
	close(release)
	awaitUpdate(t, d)
	if d.Version() != 11 {
		t.Fatalf("version %d, want 11", d.Version())
	}
	if _, _, ok := d.PeerFor(netip.MustParseAddr("10.0.0.5")); ok {
		t.Error("the rolled-back directory was applied")
	}
	if _, _, ok := d.PeerFor(netip.MustParseAddr("10.0.0.1")); ok {
		t.Error("a peer absent from version 11 is still listed")
	}
	if _, tunnel, ok := d.PeerFor(netip.MustParseAddr("::ffff:10.0.0.2")); !ok || tunnel != "10.0.0.2:15008" {
		t.Errorf("PeerFor(mapped b) = %q %v", tunnel, ok)
	}
	// Two registrations answered: the first one's log line is written.
	<-registered
	<-registered
	out := logs.String()
	for _, want := range []string{"no valid svid yet", ErrDirectoryRollback.Error(), "registered in the mesh directory"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q", want)
		}
	}
}

// A directory bigger than the limit is refused rather than truncated.
func TestReadLimited(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		size  int
		limit int64
		ok    bool
	}{
		{"under", 10, 11, true},
		{"at", 11, 11, true},
		{"over", 12, 11, false},
	} {
		b, err := readLimited(strings.NewReader(strings.Repeat("x", tc.size)), tc.limit)
		if tc.ok != (err == nil) || (tc.ok && len(b) != tc.size) {
			t.Errorf("%s: %d bytes, %v", tc.name, len(b), err)
		}
	}
}

// The documents the server writes are what the client decodes (keeps the two sides'
// types honest).
func TestDirectoryDocumentJSON(t *testing.T) {
	t.Parallel()
	doc := DirectoryDocument{Version: 1 << 60, Peers: []DirectoryEntry{{
		SPIFFEID: idA, Addresses: addrs("10.0.0.1", "fd00::1"), TunnelPort: 15008,
		Transports: []string{"tls"}, LastHeartbeat: time.Date(2030, 1, 2, 3, 4, 5, 6, time.UTC), BundleVersion: "b",
	}}}
	b, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	const want = `{"version":1152921504606846976,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["10.0.0.1","fd00::1"],"tunnel_port":15008,"transports":["tls"],"last_heartbeat":"2030-01-02T03:04:05.000000006Z","bundle_version":"b"}]}`
	if string(b) != want {
		t.Errorf("JSON:\n%s\nwant\n%s", b, want)
	}
}
