package proxy_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/proxy"
)

// waitMetric waits until n's metric name{labels} equals want.
func waitMetric(t testing.TB, n *node, name string, labels map[string]string, want float64) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		got := n.metric(t, name, labels)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s%v = %v after %s, want %v", name, labels, got, waitLimit, want)
		}
		<-tick.C
	}
}

func poolLabels(dir, tr string) map[string]string {
	return map[string]string{"direction": dir, "transport": tr}
}

func poolEnded(dir, tr, reason string) map[string]string {
	return map[string]string{"direction": dir, "transport": tr, "reason": reason}
}

// TestPooledPeerExpiry: once B's certificate on a pooled connection is about
// to expire, A opens new streams on a fresh connection (which gets B's
// current certificate) while the open stream goes on; B never sees a new
// stream on the old connection.
func TestPooledPeerExpiry(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, tr string) {
		clk := newClock()
		m := pooledMesh(t, tr, echo, func(c *proxy.Config) {
			c.Now = clk.Now
			c.StreamAudit = true
		})
		const life = 10 * time.Minute
		m.b.creds.Set(m.ca.SVID(t, idB, testca.WithLifetime(life)))
		old := m.connect(t, "before")

		// B renews; A's connection still holds the old certificate, which
		// is now a second from its NotAfter.
		m.b.creds.Set(m.ca.SVID(t, idB))
		clk.Advance(life - time.Second - time.Since(clk.Now()))
		fresh := m.connect(t, "after")
		hs := handshakesOf(m.a, tr, "outbound")
		if len(hs) != 2 || hs[0].ConnID == hs[1].ConnID {
			t.Fatalf("handshakes %+v, want a second pooled connection", hs)
		}
		if hs[1].PeerSerial != m.b.serial(t) || !hs[0].PeerNotAfter.Before(hs[1].PeerNotAfter) {
			t.Errorf("second connection peer %s (not after %s), want B's renewed certificate", hs[1].PeerSerial, hs[1].PeerNotAfter)
		}
		if err := ping(t, old, "old stream goes on"); err != nil {
			t.Fatal(err)
		}
		if got := m.a.metric(t, "agentmesh_proxy_pool_ended_total", poolEnded("outbound", tr, "credential_expired")); got != 1 {
			t.Errorf("pool_ended{credential_expired} = %v, want 1", got)
		}
		endCleanly(t, old)
		endCleanly(t, fresh)
		// On B, the two streams rode the two connections, one each: none was
		// opened on the old connection. (Stream records are written as the
		// streams end, in either order.)
		streams := waitCount(t, m.b.audit, 2, "inbound stream", func(c audit.Connection) bool { return c.Direction == "inbound" })
		in := handshakesOf(m.b, tr, "inbound")
		rode := map[string]bool{streams[0].ConnID: true, streams[1].ConnID: true}
		if len(in) != 2 || len(rode) != 2 || !rode[in[0].ConnID] || !rode[in[1].ConnID] {
			t.Errorf("inbound streams on %s, %s; connections %+v", streams[0].ConnID, streams[1].ConnID, in)
		}
	})
}

// TestPooledRefusesExpiredStream: B refuses, audits and counts a stream on a
// pooled connection whose peer certificate has expired, from a client that
// ignores the pool's rules; the streams before it were served.
func TestPooledRefusesExpiredStream(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, tr string) {
		clk := newClock()
		m := pooledMesh(t, tr, echo, func(c *proxy.Config) { c.Now = clk.Now })
		const life = 10 * time.Minute
		rc := dialRaw(t, tr, m.b.TunnelAddr(), m.ca.SVID(t, idA, testca.WithLifetime(life)))
		if st := rc.stream(t, m.target.port); st != rawOK {
			t.Fatalf("stream before the expiry answered %v", st)
		}
		clk.Advance(life + time.Second)
		if st := rc.stream(t, m.target.port); st != rawRefused {
			t.Fatalf("stream after the peer's NotAfter answered %v, want refused", st)
		}
		rec := waitFor(t, m.b.audit, "refused stream", func(c audit.Connection) bool { return c.Reason == "credential_expired" })
		hs := handshakesOf(m.b, tr, "inbound")
		if len(hs) != 1 || rec.ConnID != hs[0].ConnID || rec.PeerID != idA.String() || !rec.PeerNotAfter.Equal(hs[0].PeerNotAfter) {
			t.Errorf("refusal record %+v for connection %+v", rec, hs)
		}
		refused := map[string]string{"direction": "inbound", "transport": tr, "reason": "credential_expired"}
		if got := m.b.metric(t, "agentmesh_proxy_stream_refusals_total", refused); got != 1 {
			t.Errorf("stream_refusals{credential_expired} = %v, want 1", got)
		}
	})
}

// TestPooledMaxLifetime: a pooled connection older than PoolMaxLifetime
// drains: its open stream goes on, a new stream gets a fresh connection.
func TestPooledMaxLifetime(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, tr string) {
		m := pooledMesh(t, tr, echo, func(c *proxy.Config) {
			// A's limit only: B's would end the connection as well
			// (goaway), and A's count would depend on who is first.
			if len(c.Routes) > 0 {
				c.PoolMaxLifetime = 300 * time.Millisecond
			}
		})
		old := m.connect(t, "first")
		waitMetric(t, m.a, "agentmesh_proxy_pool_ended_total", poolEnded("outbound", tr, "max_lifetime"), 1)
		fresh := m.connect(t, "second")
		if hs := handshakesOf(m.a, tr, "outbound"); len(hs) != 2 {
			t.Fatalf("%d handshakes, want a fresh connection after the lifetime", len(hs))
		}
		if err := ping(t, old, "old stream goes on"); err != nil {
			t.Fatal(err)
		}
		endCleanly(t, old)
		// Its last stream ended: the drained connection closes.
		waitMetric(t, m.a, "agentmesh_proxy_pool_connections", poolLabels("outbound", tr), 1)
		endCleanly(t, fresh)
	})
}

// TestPooledIdleTimeout: a pooled connection without streams for
// PoolIdleTimeout is closed by the side that dialed it and, should that side
// keep it open, by the receiving side.
func TestPooledIdleTimeout(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, tr string) {
		const idle = 300 * time.Millisecond
		m := pooledMesh(t, tr, echo, func(c *proxy.Config) { c.PoolIdleTimeout = idle })
		endCleanly(t, m.connect(t, "one stream"))
		waitMetric(t, m.a, "agentmesh_proxy_pool_ended_total", poolEnded("outbound", tr, "idle_timeout"), 1)
		waitMetric(t, m.a, "agentmesh_proxy_pool_connections", poolLabels("outbound", tr), 0)
		waitMetric(t, m.b, "agentmesh_proxy_pool_connections", poolLabels("inbound", tr), 0)

		// A client that never closes its idle connection.
		rc := dialRaw(t, tr, m.b.TunnelAddr(), m.ca.SVID(t, idA))
		if st := rc.stream(t, m.target.port); st != rawOK {
			t.Fatalf("stream answered %v", st)
		}
		waitMetric(t, m.b, "agentmesh_proxy_pool_ended_total", poolEnded("inbound", tr, "idle_timeout"), 1)
		select {
		case <-rc.done:
		case <-time.After(waitLimit):
			t.Fatal("B did not close the idle connection")
		}
	})
}

// TestPooledServerStreamCap: the receiving side allows a peer PoolMaxStreams
// streams at once on one connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS,
// QUIC stream credit), whatever the peer would like.
func TestPooledServerStreamCap(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, tr string) {
		const maxStreams = 2
		m := pooledMesh(t, tr, echo, func(c *proxy.Config) { c.PoolMaxStreams = maxStreams })
		rc := dialRaw(t, tr, m.b.TunnelAddr(), m.ca.SVID(t, idA))
		if got := rc.peerMaxStreams(t, m.target.port); got != maxStreams {
			t.Fatalf("B allows %d concurrent streams, want %d", got, maxStreams)
		}
	})
}

// TestPooledH2OverMaxStreams: an h2 client that opens more streams at once
// than B allows has the extra one reset by B, which audits and counts it.
func TestPooledH2OverMaxStreams(t *testing.T) {
	t.Parallel()
	m := pooledMesh(t, proxy.TransportH2, echo, func(c *proxy.Config) { c.PoolMaxStreams = 2 })
	id, code := overMaxH2(t, m.b.TunnelAddr(), m.ca.SVID(t, idA), m.target.port, 3)
	if id != 5 || (code != http2.ErrCodeProtocol && code != http2.ErrCodeRefusedStream) {
		t.Fatalf("reset stream %d with %v, want the third (5) refused", id, code)
	}
	rec := waitFor(t, m.b.audit, "refused stream", func(c audit.Connection) bool { return c.Reason == "max_streams" })
	if hs := handshakesOf(m.b, proxy.TransportH2, "inbound"); len(hs) != 1 || rec.ConnID != hs[0].ConnID || rec.PeerID != idA.String() {
		t.Errorf("refusal record %+v for connection %+v", rec, hs)
	}
	refused := map[string]string{"direction": "inbound", "transport": proxy.TransportH2, "reason": "max_streams"}
	if got := m.b.metric(t, "agentmesh_proxy_stream_refusals_total", refused); got != 1 {
		t.Errorf("stream_refusals{max_streams} = %v, want 1", got)
	}
}

// overMaxH2 speaks HTTP/2 frames to B's tunnel presenting svid: it
// acknowledges B's SETTINGS, opens n CONNECT streams to port without
// waiting, and returns the first stream B resets and the code.
func overMaxH2(t *testing.T, tunnel net.Addr, svid *x509svid.SVID, port uint16, n int) (uint32, http2.ErrCode) {
	t.Helper()
	d := tls.Dialer{Config: &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{*testca.TLSCertificate(svid)},
		// Only B's verification of the client is under test.
		InsecureSkipVerify: true, //nolint:gosec,forbidigo // test client, see above
		NextProtos:         []string{proxy.ALPNH2},
	}}
	c, err := d.DialContext(t.Context(), "tcp", tunnel.String())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(waitLimit))
	fr := http2.NewFramer(c, c)
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("read B's settings: %v", err)
		}
		if sf, ok := f.(*http2.SettingsFrame); ok && !sf.IsAck() {
			break
		}
	}
	// B counts a stream past its limit as the client's fault only once
	// its SETTINGS are acknowledged; the acknowledgement goes first.
	if err := fr.WriteSettingsAck(); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		block.Reset()
		_ = enc.WriteField(hpack.HeaderField{Name: ":method", Value: http.MethodConnect})
		_ = enc.WriteField(hpack.HeaderField{Name: ":authority", Value: net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port)))})
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: uint32(2*i + 1), BlockFragment: block.Bytes(), EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
	}
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("no stream reset: %v", err)
		}
		if rst, ok := f.(*http2.RSTStreamFrame); ok {
			return rst.StreamID, rst.ErrCode
		}
	}
}

// rawStatus is what a raw client's stream was answered.
type rawStatus string

const (
	rawOK      rawStatus = "ok"
	rawRefused rawStatus = "refused" // 403 / status 0x01: not allowed
	rawOther   rawStatus = "other"
)

// rawClient is a pooled-transport client of B that follows none of the
// pool's rules: it opens a stream whenever told, on one connection.
type rawClient struct {
	h2   *http2.ClientConn
	quic *quic.Conn
	done chan struct{} // closed when the connection has ended
}

// dialRaw connects to B's tunnel (tr: h2 or quic) presenting svid.
func dialRaw(t *testing.T, tr string, tunnel net.Addr, svid *x509svid.SVID) *rawClient {
	t.Helper()
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{*testca.TLSCertificate(svid)},
		// Only B's verification of the client is under test.
		InsecureSkipVerify: true, //nolint:gosec,forbidigo // test client, see above
	}
	rc := &rawClient{done: make(chan struct{})}
	ctx, cancel := context.WithTimeout(t.Context(), waitLimit)
	defer cancel()
	switch tr {
	case proxy.TransportH2:
		cfg.NextProtos = []string{proxy.ALPNH2}
		d := tls.Dialer{Config: cfg}
		c, err := d.DialContext(ctx, "tcp", tunnel.String())
		if err != nil {
			t.Fatal(err)
		}
		tc := &notifyConn{Conn: c, done: rc.done}
		if rc.h2, err = (&http2.Transport{}).NewClientConn(tc); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = rc.h2.Close() })
	case proxy.TransportQUIC:
		cfg.NextProtos = []string{proxy.ALPNQUIC}
		conn, err := quic.DialAddr(ctx, tunnel.String(), cfg, &quic.Config{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = conn.CloseWithError(0, "") })
		ctrl, err := conn.AcceptUniStream(ctx)
		var b [1]byte
		if err == nil {
			_, err = io.ReadFull(ctrl, b[:])
		}
		if err != nil || b[0] != 0 {
			t.Fatalf("control stream: %v %#02x", err, b[0])
		}
		rc.quic = conn
		context.AfterFunc(conn.Context(), func() { close(rc.done) })
	}
	return rc
}

// notifyConn reports when x/net closes the connection (idle, GOAWAY, error).
type notifyConn struct {
	net.Conn
	done   chan struct{}
	closed bool
}

func (c *notifyConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if err != nil && !c.closed { // only x/net's read loop reads
		c.closed = true
		close(c.done)
	}
	return n, err
}

// stream opens one stream asking for port, echoes a ping through it when
// it is accepted, and ends it.
func (rc *rawClient) stream(t *testing.T, port uint16) rawStatus {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), waitLimit)
	defer cancel()
	var rw io.ReadWriter
	var end func()
	var st rawStatus
	if rc.h2 != nil {
		pr, pw := io.Pipe()
		req, err := http.NewRequestWithContext(ctx, http.MethodConnect, "http://"+net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))), pr)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := rc.h2.RoundTrip(req)
		if err != nil {
			t.Fatalf("CONNECT: %v", err)
		}
		defer func() { _ = resp.Body.Close() }()
		switch resp.StatusCode {
		case http.StatusOK:
			st = rawOK
		case http.StatusForbidden:
			st = rawRefused
		default:
			st = rawOther
		}
		rw, end = struct {
			io.Reader
			io.Writer
		}{resp.Body, pw}, func() { _ = pw.Close() }
	} else {
		s, err := rc.quic.OpenStreamSync(ctx)
		if err != nil {
			t.Fatalf("open stream: %v", err)
		}
		_ = s.SetDeadline(time.Now().Add(waitLimit))
		var b [1]byte
		if _, err := s.Write(tunnelHeader(port)); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(s, b[:]); err != nil {
			t.Fatalf("status: %v", err)
		}
		switch b[0] {
		case 0:
			st = rawOK
		case 1:
			st = rawRefused
		default:
			st = rawOther
		}
		rw, end = s, func() { _ = s.Close() }
	}
	defer end()
	if st == rawOK {
		const msg = "raw"
		buf := make([]byte, len(msg))
		if _, err := rw.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(rw, buf); err != nil || string(buf) != msg {
			t.Fatalf("echo %q, %v", buf, err)
		}
	}
	return st
}

// peerMaxStreams is how many streams B allows at once on the connection,
// which must be fresh.
func (rc *rawClient) peerMaxStreams(t *testing.T, port uint16) int {
	t.Helper()
	if rc.h2 != nil {
		// Once a stream was answered, B's SETTINGS are in force.
		if st := rc.stream(t, port); st != rawOK {
			t.Fatalf("stream answered %v", st)
		}
		return int(rc.h2.State().MaxConcurrentStreams)
	}
	// Opening takes B's credit; past it, no stream can be opened.
	for n := 0; ; n++ {
		s, err := rc.quic.OpenStream()
		var limit *quic.StreamLimitReachedError
		if errors.As(err, &limit) {
			return n
		}
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.CancelWrite(0) })
		if n > 1000 {
			t.Fatal("no stream limit")
		}
	}
}
