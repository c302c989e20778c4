package meshclient

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/internal/testlog"
	"github.com/agentmesh/agentmesh/meshapi"
)

// The retry schedule: full jitter under a bound that doubles from base per attempt
// and stops at maxDelay.
func TestBackOffBounds(t *testing.T) {
	t.Parallel()
	const base, maxDelay = 500 * time.Millisecond, 10 * time.Second
	bounds := []time.Duration{500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, maxDelay, maxDelay, maxDelay}
	top := make([]time.Duration, len(bounds))
	for range 300 {
		b := newBackOff(base, maxDelay)
		b.Reset()
		for i, bound := range bounds {
			d := b.NextBackOff()
			if d < 0 || d > bound {
				t.Fatalf("attempt %d: wait %v outside [0, %v]", i+1, d, bound)
			}
			top[i] = max(top[i], d)
		}
	}
	for i, bound := range bounds {
		if top[i] < bound/2 {
			t.Errorf("attempt %d: longest of 300 waits %v, want the jitter to span [0, %v]", i+1, top[i], bound)
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
		if got := jittered(tc.interval, tc.r); got != tc.want {
			t.Errorf("%s: jittered(%v, %v) = %v, want %v", tc.name, tc.interval, tc.r, got, tc.want)
		}
	}
}

func TestNewDirectoryValidates(t *testing.T) {
	t.Parallel()
	cert := func() (*tls.Certificate, error) { return nil, errors.New("none") }
	valid := Config{
		URL: "https://ca.mesh.test:9443", Roots: []*x509.Certificate{{}}, Certificate: cert,
		Addresses: addrs("10.0.0.1"), TunnelPort: 15008,
	}
	tooMany := make([]netip.Addr, meshapi.MaxAddresses+1)
	for i := range tooMany {
		tooMany[i] = netip.AddrFrom4([4]byte{10, 0, 1, byte(i)})
	}
	for _, tc := range []struct {
		name      string
		mutate    func(*Config)
		ok        bool
		watchOnly bool
	}{
		{"valid", func(*Config) {}, true, false},
		{"mapped and duplicate addresses", func(c *Config) { c.Addresses = addrs("::ffff:10.0.0.1", "10.0.0.1") }, true, false},
		{"no addresses: watch only", func(c *Config) { c.Addresses = nil }, true, true},
		{"watch only needs no tunnel port", func(c *Config) { c.Addresses, c.TunnelPort = nil, 0 }, true, true},
		{"http", func(c *Config) { c.URL = "http://ca.mesh.test:9443" }, false, false},
		{"no roots", func(c *Config) { c.Roots = nil }, false, false},
		{"no certificate source", func(c *Config) { c.Certificate = nil }, false, false},
		{"too many addresses", func(c *Config) { c.Addresses = tooMany }, false, false},
		{"zero address", func(c *Config) { c.Addresses = []netip.Addr{{}} }, false, false},
		{"unspecified address", func(c *Config) { c.Addresses = addrs("0.0.0.0") }, false, false},
		{"zoned address", func(c *Config) { c.Addresses = addrs("fe80::1%eth0") }, false, false},
		{"no tunnel port", func(c *Config) { c.TunnelPort = 0 }, false, false},
		{"negative heartbeat", func(c *Config) { c.Heartbeat = -time.Second }, false, false},
		{"negative poll interval", func(c *Config) { c.PollInterval = -time.Second }, false, false},
		{"bad transport", func(c *Config) { c.Transports = []string{"TLS 1.3"} }, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := valid
			tc.mutate(&cfg)
			d, err := NewMember(cfg)
			if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrInvalidConfig)) {
				t.Fatalf("newTestDirectory = %v", err)
			}
			if d != nil {
				if _, _, ok := d.Watch.State().PeerFor(netip.MustParseAddr("10.0.0.2")); ok || d.Watch.State().Version() != 0 {
					t.Error("a new Directory knows peers")
				}
				if d.Watch.State().DenyList() != nil || d.Watch.CheckFresh(time.Minute) != nil {
					t.Error("a new Directory holds a deny-list, or is not fresh")
				}
				switch {
				case tc.watchOnly && d.Heartbeat != nil:
					t.Errorf("watch-only member registers: %+v", d.Heartbeat.body)
				case tc.watchOnly:
				case !tc.watchOnly && (len(d.Heartbeat.body.Addresses) != 1 || d.Heartbeat.body.Addresses[0] != "10.0.0.1" || d.Heartbeat.body.Transports[0] != "tls"):
					t.Errorf("register body %+v", d.Heartbeat.body)
				}
			}
		})
	}
}

// selfSignedSVID is an X509-SVID for id signed by its own key: enough for a fake CA
// that only reads the ID.
func selfSignedSVID(t *testing.T, id spiffeid.ID) *tls.Certificate {
	t.Helper()
	key := testca.NewKey(t)
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
func awaitUpdate(t *testing.T, d *Member) {
	t.Helper()
	select {
	case <-d.Watch.Updated():
	case <-time.After(15 * time.Second):
		t.Fatalf("no directory update (version %d)", d.Watch.State().Version())
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
			writeError(w, http.StatusUnauthorized, "no client certificate")
			return
		}
		switch r.URL.Path {
		case meshapi.Prefix + meshapi.RegisterPath:
			var req meshapi.RegisterRequest
			if err := meshapi.DecodeStrict(r.Body, &req); err != nil || req.TunnelPort != 15008 || req.BundleVersion != "b1" {
				writeError(w, http.StatusBadRequest, fmt.Sprintf("%+v %v", req, err))
				return
			}
			writeJSON(w, meshapi.RegisterResponse{Version: 10})
			select {
			case registered <- struct{}{}:
			default:
			}
		case meshapi.Prefix + meshapi.DirectoryPath:
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
	logger, logs := testlog.New(t)
	d, err := NewMember(Config{
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
	if d.Watch.State().Version() != 10 {
		t.Fatalf("version %d, want 10", d.Watch.State().Version())
	}
	if err := d.Run(ctx); !errors.Is(err, ErrRunning) {
		t.Errorf("second concurrent Run: %v, want ErrRunning", err)
	}
	if id, tunnel, ok := d.Watch.State().PeerFor(netip.MustParseAddr("10.0.0.1")); !ok || id.String() != "spiffe://mesh.test/host/a" || tunnel != "10.0.0.1:15008" {
		t.Fatalf("PeerFor(a) = %v %q %v", id, tunnel, ok)
	}
	if _, _, ok := d.Watch.State().PeerFor(netip.MustParseAddr("10.0.0.9")); ok {
		t.Error("PeerFor returned this proxy's own entry")
	}

	// Version 5 is refused; 11 is applied next. The refused document's peer never
	// shows.
	close(release)
	awaitUpdate(t, d)
	if d.Watch.State().Version() != 11 {
		t.Fatalf("version %d, want 11", d.Watch.State().Version())
	}
	if _, _, ok := d.Watch.State().PeerFor(netip.MustParseAddr("10.0.0.5")); ok {
		t.Error("the rolled-back directory was applied")
	}
	if _, _, ok := d.Watch.State().PeerFor(netip.MustParseAddr("10.0.0.1")); ok {
		t.Error("a peer absent from version 11 is still listed")
	}
	if _, tunnel, ok := d.Watch.State().PeerFor(netip.MustParseAddr("::ffff:10.0.0.2")); !ok || tunnel != "10.0.0.2:15008" {
		t.Errorf("PeerFor(mapped b) = %q %v", tunnel, ok)
	}
	// Two registrations answered: the first one's log line is written.
	<-registered
	<-registered
	out := logs.String()
	for _, want := range []string{"no valid svid yet", meshapi.ErrDirectoryRollback.Error(), "registered in the mesh directory"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q", want)
		}
	}
}
