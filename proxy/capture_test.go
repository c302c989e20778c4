package proxy_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/proxy"
)

// staticDirectory is a Directory from a fixed map, as a registry snapshot
// would be.
type staticDirectory map[netip.Addr]proxy.Peer

func (d staticDirectory) PeerFor(a netip.Addr) (proxy.Peer, bool) {
	p, ok := d[a]
	return p, ok
}

var _ proxy.Directory = staticDirectory(nil)

// captureMesh is B in front of three local targets (an echo server, an HTTP
// server and an HTTPS server) and A, which captures explicitly and whose
// Directory says B lives at 127.0.0.1.
type captureMesh struct {
	ca      *testca.CA
	a, b    *node
	echo    *target
	webPort uint16 // plain HTTP behind B
	tlsPort uint16 // HTTPS behind B
}

func newCaptureMesh(t *testing.T, mutate func(*proxy.Config, *captureMesh)) *captureMesh {
	t.Helper()
	m := &captureMesh{ca: testca.New(t), echo: startTarget(t, echo)}
	web := httptest.NewServer(http.HandlerFunc(webHandler))
	t.Cleanup(web.Close)
	tlsWeb := httptest.NewTLSServer(http.HandlerFunc(webHandler))
	t.Cleanup(tlsWeb.Close)
	m.webPort, m.tlsPort = portOf(t, web.Listener.Addr()), portOf(t, tlsWeb.Listener.Addr())

	allowA := []spiffeid.ID{idA}
	m.b = start(t, m.ca, idB, proxy.Config{Services: []proxy.Service{
		{Port: m.echo.port, Allow: allowA},
		{Port: m.webPort, Allow: allowA},
		{Port: m.tlsPort, Allow: allowA},
	}})
	cfg := proxy.Config{
		Explicit:  "127.0.0.1:0",
		Directory: staticDirectory{netip.MustParseAddr("127.0.0.1"): {ID: idB, Tunnel: m.b.TunnelAddr().String()}},
	}
	if mutate != nil {
		mutate(&cfg, m)
	}
	m.a = start(t, m.ca, idA, cfg)
	return m
}

// webHandler says what arrived, so tests can check the rewriting.
func webHandler(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	_, _ = fmt.Fprintf(w, "%s %s host=%s proxy_connection=%q close=%v body=%q",
		r.Method, r.RequestURI, r.Host, r.Header.Get("Proxy-Connection"), r.Close, body)
}

func portOf(t testing.TB, a net.Addr) uint16 {
	t.Helper()
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		t.Fatal(err)
	}
	return ap.Port()
}

// dialExplicit connects to A's explicit listener as a client would.
func (m *captureMesh) dialExplicit(t *testing.T) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", m.a.ExplicitAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(waitLimit))
	return c.(*net.TCPConn)
}

// expect reads exactly len(want) bytes and compares them.
func expect(t *testing.T, c net.Conn, want []byte) {
	t.Helper()
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read %q: got %q, %v", want, got, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("got %q, want %q", got, want)
	}
}

// SOCKS5 client messages, written by hand from RFC 1928.
var (
	socksGreeting  = []byte{0x05, 0x01, 0x00}
	socksNoAuth    = []byte{0x05, 0x00}
	socksSucceeded = []byte{0x05, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0}
)

func socksConnectIP(ap netip.AddrPort) []byte {
	b := []byte{0x05, 0x01, 0x00, 0x01}
	if ap.Addr().Is6() {
		b[3] = 0x04
	}
	b = append(b, ap.Addr().AsSlice()...)
	return binary.BigEndian.AppendUint16(b, ap.Port())
}

func socksConnectName(name string, port uint16) []byte {
	b := append([]byte{0x05, 0x01, 0x00, 0x03, byte(len(name))}, name...)
	return binary.BigEndian.AppendUint16(b, port)
}

func socksReply(rep byte) []byte { return []byte{0x05, rep, 0x00, 0x01, 0, 0, 0, 0, 0, 0} }

func loopbackPort(port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port)
}

// TestExplicitConnect: HTTP CONNECT and SOCKS5 CONNECT (address and
// domain-name forms) reach the echo target behind B through a verified
// tunnel, and are audited and counted as explicit captures.
func TestExplicitConnect(t *testing.T) {
	t.Parallel()
	m := newCaptureMesh(t, nil)
	target := loopbackPort(m.echo.port)
	tests := []struct {
		name      string
		handshake func(t *testing.T, c net.Conn)
	}{
		{name: "http_connect", handshake: func(t *testing.T, c net.Conn) {
			_, _ = fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Connection: Keep-Alive\r\n\r\n", target, target)
			expect(t, c, []byte("HTTP/1.1 200 Connection Established\r\n\r\n"))
		}},
		{name: "socks5_ipv4", handshake: func(t *testing.T, c net.Conn) {
			_, _ = c.Write(socksGreeting)
			expect(t, c, socksNoAuth)
			_, _ = c.Write(socksConnectIP(target))
			expect(t, c, socksSucceeded)
		}},
		{name: "socks5_domain", handshake: func(t *testing.T, c net.Conn) {
			// One write: the server must not lose the request behind the greeting.
			_, _ = c.Write(append(append([]byte{}, socksGreeting...), socksConnectName("localhost", m.echo.port)...))
			expect(t, c, append(append([]byte{}, socksNoAuth...), socksSucceeded...))
		}},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			from := m.a.audit.len()
			c := m.dialExplicit(t)
			tc.handshake(t, c)
			if err := ping(t, c, "through "+tc.name); err != nil {
				t.Fatal(err)
			}
			_ = c.CloseWrite()
			if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
				t.Fatalf("after half-close: %q, %v", rest, err)
			}
			h := waitForFrom(t, m.a.audit, from, "ok", func(h audit.Handshake) bool { return true })
			if h.Result != "ok" || h.PeerID != idB.String() || h.Transport != "tls" || h.PeerAddr != m.b.TunnelAddr().String() {
				t.Errorf("handshake record %+v", h)
			}
			rec := waitForFrom(t, m.a.audit, from, "closed", func(audit.Connection) bool { return true })
			if rec.Target != target.String() || rec.PeerID != idB.String() || rec.Reason != "" {
				t.Errorf("connection record %+v, want target %s", rec, target)
			}
			labels := map[string]string{"mode": "explicit", "result": "ok"}
			if got := m.a.metric(t, "agentmesh_proxy_captured_total", labels); got != float64(i+1) {
				t.Errorf("captured_total%v = %v, want %d", labels, got, i+1)
			}
		})
	}
}

// TestExplicitHTTPProxy: a stock Go client with Proxy set sends
// absolute-URI requests; the server behind B sees them in origin form with
// Connection: close.
func TestExplicitHTTPProxy(t *testing.T) {
	t.Parallel()
	m := newCaptureMesh(t, nil)
	proxyURL := &url.URL{Scheme: "http", Host: m.a.ExplicitAddr().String()}
	tr := &http.Transport{Proxy: http.ProxyURL(proxyURL)}
	t.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Transport: tr, Timeout: waitLimit}
	web := fmt.Sprintf("127.0.0.1:%d", m.webPort)
	tests := []struct {
		name string
		do   func() (*http.Response, error)
		want string
	}{
		{
			name: "get",
			do:   func() (*http.Response, error) { return client.Get("http://" + web + "/hello?x=1") },
			want: `GET /hello?x=1 host=` + web + ` proxy_connection="" close=true body=""`,
		},
		{
			name: "post",
			do: func() (*http.Response, error) {
				return client.Post("http://"+web+"/up", "text/plain", strings.NewReader("payload"))
			},
			want: `POST /up host=` + web + ` proxy_connection="" close=true body="payload"`,
		},
		{
			name: "host_name",
			do:   func() (*http.Response, error) { return client.Get(fmt.Sprintf("http://localhost:%d/", m.webPort)) },
			want: fmt.Sprintf(`GET / host=localhost:%d proxy_connection="" close=true body=""`, m.webPort),
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := tc.do()
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			if err != nil || resp.StatusCode != http.StatusOK || string(body) != tc.want {
				t.Fatalf("%d %q, %v; want 200 %q", resp.StatusCode, body, err, tc.want)
			}
		})
	}
}

// TestExplicitRefusals: every refused or failed explicit request gets its
// protocol's exact error reply, one audit record with the reason, and is
// counted; the proxy keeps serving.
func TestExplicitRefusals(t *testing.T) {
	t.Parallel()
	impostor := startImpostor(t, testca.New(t).SVID(t, idB)) // right ID, foreign CA
	m := newCaptureMesh(t, func(c *proxy.Config, m *captureMesh) {
		c.HandshakeTimeout = 2 * time.Second // the silent client's case
		c.DialTimeout = 2 * time.Second      // the resolver's
		c.Directory = staticDirectory{
			netip.MustParseAddr("127.0.0.1"): {ID: idB, Tunnel: m.b.TunnelAddr().String()},
			netip.MustParseAddr("127.0.0.3"): {ID: idB, Tunnel: "127.0.0.1:1"}, // nobody listens
			netip.MustParseAddr("127.0.0.4"): {ID: idB, Tunnel: impostor},
		}
	})
	explicit, tunnel := m.a.ExplicitAddr().String(), m.a.TunnelAddr().String()
	bTunnel := m.b.TunnelAddr().String()
	notMeshed := loopbackPort(m.echo.port + 1) // not a Service of B
	greetAnd := func(req []byte) []byte { return append(append([]byte{}, socksGreeting...), req...) }
	noAuthAnd := func(rep byte) []byte { return append(append([]byte{}, socksNoAuth...), socksReply(rep)...) }
	httpReply := func(status string, reason string) []byte {
		body := "agentmesh: " + reason + "\n"
		return []byte(fmt.Sprintf("HTTP/1.1 %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", status, len(body), body))
	}
	const client = "client" // peerAddr placeholder: the client's own address

	tests := []struct {
		name      string
		send      []byte
		want      []byte // everything the client reads before the close
		reason    proxy.Reason
		result    audit.Result // audit result
		captured  string       // result label of captured_total
		transport string
		peerAddr  string
	}{
		{name: "http_unknown_destination", send: []byte("CONNECT 127.0.0.2:81 HTTP/1.1\r\n\r\n"), want: httpReply("403 Forbidden", "unknown_destination"),
			reason: proxy.ReasonUnknownDestination, result: "refused", captured: "denied", transport: "none", peerAddr: "127.0.0.2:81"},
		{name: "socks_unknown_destination", send: greetAnd(socksConnectIP(netip.MustParseAddrPort("127.0.0.2:82"))), want: noAuthAnd(0x02),
			reason: proxy.ReasonUnknownDestination, result: "refused", captured: "denied", transport: "none", peerAddr: "127.0.0.2:82"},
		{name: "http_loop_explicit_listener", send: []byte("CONNECT " + explicit + " HTTP/1.1\r\n\r\n"), want: httpReply("403 Forbidden", "loop"),
			reason: proxy.ReasonLoop, result: "refused", captured: "refused", transport: "none", peerAddr: explicit},
		{name: "socks_loop_tunnel_listener", send: greetAnd(socksConnectIP(netip.MustParseAddrPort(tunnel))), want: noAuthAnd(0x02),
			reason: proxy.ReasonLoop, result: "refused", captured: "refused", transport: "none", peerAddr: tunnel},
		{name: "http_loop_peer_tunnel", send: []byte("GET http://" + bTunnel + "/ HTTP/1.1\r\n\r\n"), want: httpReply("403 Forbidden", "loop"),
			reason: proxy.ReasonLoop, result: "refused", captured: "refused", transport: "none", peerAddr: bTunnel},
		{name: "socks_bind", send: greetAnd([]byte{0x05, 0x02, 0x00, 0x01, 127, 0, 0, 1, 0, 80}), want: noAuthAnd(0x07),
			reason: proxy.ReasonUnsupportedRequest, result: "refused", captured: "refused", transport: "none", peerAddr: client},
		{name: "socks_address_type", send: greetAnd([]byte{0x05, 0x01, 0x00, 0x05, 127, 0, 0, 1, 0, 80}), want: noAuthAnd(0x08),
			reason: proxy.ReasonUnsupportedRequest, result: "refused", captured: "refused", transport: "none", peerAddr: client},
		{name: "socks_username_password_only", send: []byte{0x05, 0x01, 0x02}, want: []byte{0x05, 0xff},
			reason: proxy.ReasonUnsupportedRequest, result: "refused", captured: "refused", transport: "none", peerAddr: client},
		{name: "http_origin_form", send: []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
			want:   []byte("HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 31\r\nConnection: close\r\nAllow: CONNECT\r\n\r\nagentmesh: unsupported_request\n"),
			reason: proxy.ReasonUnsupportedRequest, result: "refused", captured: "refused", transport: "none", peerAddr: client},
		{name: "http_malformed", send: []byte("GET http://example.com/ HTTP/9.9\r\n\r\n"), want: httpReply("400 Bad Request", "bad_request"),
			reason: proxy.ReasonBadRequest, result: "refused", captured: "refused", transport: "none", peerAddr: client},
		{name: "http_head_too_large", send: []byte("GET http://example.com/ HTTP/1.1\r\nX-Big: " + strings.Repeat("a", 17<<10) + "\r\n\r\n"),
			want:   httpReply("400 Bad Request", "bad_request"),
			reason: proxy.ReasonBadRequest, result: "refused", captured: "refused", transport: "none", peerAddr: client},
		{name: "http_peer_unreachable", send: []byte("CONNECT 127.0.0.3:80 HTTP/1.1\r\n\r\n"), want: httpReply("502 Bad Gateway", "peer_unreachable"),
			reason: proxy.ReasonPeerUnreachable, result: "error", captured: "error", transport: "tls", peerAddr: "127.0.0.1:1"},
		{name: "socks_peer_unreachable", send: greetAnd(socksConnectIP(netip.MustParseAddrPort("127.0.0.3:80"))), want: noAuthAnd(0x04),
			reason: proxy.ReasonPeerUnreachable, result: "error", captured: "error", transport: "tls", peerAddr: "127.0.0.1:1"},
		{name: "http_peer_foreign_ca", send: []byte("CONNECT 127.0.0.4:80 HTTP/1.1\r\n\r\n"), want: httpReply("403 Forbidden", "unknown_authority"),
			reason: proxy.ReasonUnknownAuthority, result: "refused", captured: "refused", transport: "tls", peerAddr: impostor},
		{name: "http_port_not_meshed_at_peer", send: []byte("CONNECT " + notMeshed.String() + " HTTP/1.1\r\n\r\n"), want: httpReply("403 Forbidden", "peer_refused"),
			reason: proxy.ReasonPeerRefused, result: "refused", captured: "refused", transport: "tls", peerAddr: bTunnel},
		{name: "socks_resolve_failed", send: greetAnd(socksConnectName("no-such-host.invalid", 80)), want: noAuthAnd(0x04),
			reason: proxy.ReasonResolveFailed, result: "error", captured: "error", transport: "none", peerAddr: "no-such-host.invalid:80"},
		{name: "silent_client", send: nil, want: nil,
			reason: proxy.ReasonTimeout, result: "refused", captured: "refused", transport: "none", peerAddr: client},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			labels := map[string]string{"mode": "explicit", "result": tc.captured}
			before := m.a.metric(t, "agentmesh_proxy_captured_total", labels)
			from := m.a.audit.len()
			c := m.dialExplicit(t)
			if _, err := c.Write(tc.send); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("read reply: %v (after %q)", err, got)
			}
			if !bytes.Equal(got, tc.want) {
				t.Fatalf("reply %q, want %q", got, tc.want)
			}
			want := tc.peerAddr
			if want == client {
				want = c.LocalAddr().String()
			}
			rec := waitForFrom(t, m.a.audit, from, string(tc.reason), func(h audit.Handshake) bool { return h.Reason == string(tc.reason) })
			if rec.Direction != "outbound" || rec.Result != tc.result || rec.Transport != tc.transport || rec.PeerAddr != want {
				t.Errorf("record %+v, want result %s transport %s peer_addr %s", rec, tc.result, tc.transport, want)
			}
			if after := m.a.metric(t, "agentmesh_proxy_captured_total", labels); after != before+1 {
				t.Errorf("captured_total%v went %v -> %v, want +1", labels, before, after)
			}
			// Still serving.
			ok := m.dialExplicit(t)
			_, _ = ok.Write(greetAnd(socksConnectIP(loopbackPort(m.echo.port))))
			expect(t, ok, append(append([]byte{}, socksNoAuth...), socksSucceeded...))
			if err := ping(t, ok, "still serving after "+tc.name); err != nil {
				t.Fatal(err)
			}
		})
	}
	// Explicit refusals are not tunnel handshakes; only the tunnel attempts
	// (unreachable, foreign CA, refused by the peer, and the checks) count.
	if got := m.a.metric(t, "agentmesh_proxy_handshakes_total", map[string]string{"direction": "outbound", "result": "refused"}); got != 2 {
		t.Errorf("handshakes_total{outbound,refused} = %v, want 2 (foreign CA, refused by the peer)", got)
	}
}

// TestExplicitPassthrough: with UnknownPassthrough a destination no proxy
// lives at is dialed directly, audited as passthrough, and is not a tunnel
// handshake.
func TestExplicitPassthrough(t *testing.T) {
	t.Parallel()
	plain := startTargetAt(t, "127.0.0.2:0", echo)
	dst := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), plain.port)
	m := newCaptureMesh(t, func(c *proxy.Config, _ *captureMesh) { c.Unknown = proxy.UnknownPassthrough })
	tests := []struct {
		name      string
		handshake func(t *testing.T, c net.Conn)
	}{
		{name: "http_connect", handshake: func(t *testing.T, c net.Conn) {
			_, _ = fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\n\r\n", dst)
			expect(t, c, []byte("HTTP/1.1 200 Connection Established\r\n\r\n"))
		}},
		{name: "socks5", handshake: func(t *testing.T, c net.Conn) {
			_, _ = c.Write(socksGreeting)
			expect(t, c, socksNoAuth)
			_, _ = c.Write(socksConnectIP(dst))
			expect(t, c, socksSucceeded)
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			from := m.a.audit.len()
			c := m.dialExplicit(t)
			tc.handshake(t, c)
			if err := ping(t, c, "passthrough via "+tc.name); err != nil {
				t.Fatal(err)
			}
			_ = c.Close()
			h := waitForFrom(t, m.a.audit, from, "passthrough", func(h audit.Handshake) bool { return true })
			if h.Result != "ok" || h.Reason != string(proxy.ReasonPassthrough) || h.Transport != "tcp" || h.PeerAddr != dst.String() || h.PeerID != "" {
				t.Errorf("handshake record %+v", h)
			}
			rec := waitForFrom(t, m.a.audit, from, "closed", func(audit.Connection) bool { return true })
			if rec.Target != dst.String() || rec.PeerID != "" || rec.BytesOut == 0 {
				t.Errorf("connection record %+v", rec)
			}
		})
	}
	if got := m.a.metric(t, "agentmesh_proxy_captured_total", map[string]string{"mode": "explicit", "result": "passthrough"}); got != 2 {
		t.Errorf("captured_total{explicit,passthrough} = %v, want 2", got)
	}
	if got := m.a.metric(t, "agentmesh_proxy_handshakes_total", map[string]string{"direction": "outbound"}); got != 0 {
		t.Errorf("handshakes_total{outbound} = %v, want 0: passthrough is not a handshake", got)
	}
}

// TestExplicitAuditUnavailable: with the audit log failed nothing is
// carried, and the client is told.
func TestExplicitAuditUnavailable(t *testing.T) {
	t.Parallel()
	m := newCaptureMesh(t, nil)
	m.a.audit.fail(errTest)
	c := m.dialExplicit(t)
	_, _ = fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\n\r\n", loopbackPort(m.echo.port))
	got, _ := io.ReadAll(c)
	if !bytes.HasPrefix(got, []byte("HTTP/1.1 502 Bad Gateway\r\n")) || !bytes.HasSuffix(got, []byte("agentmesh: audit_unavailable\n")) {
		t.Fatalf("reply %q, want 502 audit_unavailable", got)
	}
	if got := m.a.metric(t, "agentmesh_proxy_captured_total", map[string]string{"mode": "explicit", "result": "error"}); got != 1 {
		t.Fatalf("captured_total{explicit,error} = %v, want 1", got)
	}
}

// TestRouteCounted: Routes are counted as mode route.
func TestRouteCounted(t *testing.T) {
	t.Parallel()
	m := newMesh(t, echo)
	if err := ping(t, m.dialRoute(t), "route"); err != nil {
		t.Fatal(err)
	}
	if got := m.a.metric(t, "agentmesh_proxy_captured_total", map[string]string{"mode": "route", "result": "ok"}); got != 1 {
		t.Fatalf("captured_total{route,ok} = %v, want 1", got)
	}
}

// TestCaptureConfig: the new Config fields are validated and the capture
// listeners are reported only when configured.
func TestCaptureConfig(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	creds := testca.NewCredentials(ca, ca.SVID(t, idA))
	base := proxy.Config{ID: idA, Credentials: creds, TunnelListen: "127.0.0.1:0"}
	tests := []struct {
		name   string
		mutate func(*proxy.Config)
	}{
		{name: "unknown_policy_out_of_range", mutate: func(c *proxy.Config) { c.Unknown = proxy.UnknownPolicy(7) }},
		{name: "negative_mark", mutate: func(c *proxy.Config) { c.Mark = -1 }},
		{name: "mark_over_32_bits", mutate: func(c *proxy.Config) { c.Mark = 1 << 40 }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := base
			tc.mutate(&cfg)
			if _, err := proxy.New(cfg); !errors.Is(err, proxy.ErrInvalidConfig) {
				t.Fatalf("New error = %v, want ErrInvalidConfig", err)
			}
		})
	}
	t.Run("listeners_off_by_default", func(t *testing.T) {
		t.Parallel()
		p, err := proxy.New(base)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = p.Close() }()
		if p.OutboundAddr() != nil || p.ExplicitAddr() != nil {
			t.Fatalf("OutboundAddr %v, ExplicitAddr %v, want nil", p.OutboundAddr(), p.ExplicitAddr())
		}
	})
	t.Run("explicit_port_in_use", func(t *testing.T) {
		t.Parallel()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = ln.Close() }()
		cfg := base
		cfg.Explicit = ln.Addr().String()
		if _, err := proxy.New(cfg); err == nil || !strings.Contains(err.Error(), "explicit") {
			t.Fatalf("New = %v, want a listen error naming the explicit listener", err)
		}
	})
	if got := proxy.UnknownPassthrough.String() + "," + proxy.UnknownDeny.String() + "," + strconv.Quote(proxy.UnknownPolicy(9).String()); got != `passthrough,deny,"UnknownPolicy(9)"` {
		t.Errorf("UnknownPolicy strings %s", got)
	}
}
