package proxy_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/proxy"
)

// pooledTransports are the transports that carry agent connections as
// streams of pooled connections; every test here runs on each.
var pooledTransports = []string{proxy.TransportH2, proxy.TransportQUIC}

// eachPooled runs f as a parallel subtest per pooled transport.
func eachPooled(t *testing.T, f func(t *testing.T, transport string)) {
	t.Helper()
	for _, tr := range pooledTransports {
		t.Run(tr, func(t *testing.T) {
			t.Parallel()
			f(t, tr)
		})
	}
}

// pooledMesh is newMesh with A's route on transport and both proxies
// offering it (tls second); cfg, if set, then adjusts both configs.
func pooledMesh(t testing.TB, transport string, handle func(*net.TCPConn), cfg func(*proxy.Config)) *mesh {
	t.Helper()
	return newMeshWith(t, handle, func(c *proxy.Config) {
		c.Transports = []string{transport, proxy.TransportTLS}
		for i := range c.Routes {
			c.Routes[i].Transport = transport
		}
		if cfg != nil {
			cfg(c)
		}
	})
}

// handshakesOf returns n's handshake records of transport and direction.
func handshakesOf(n *node, transport, dir string) []audit.Handshake {
	var out []audit.Handshake
	for _, h := range n.audit.handshakes() {
		if h.Transport == transport && h.Direction == dir {
			out = append(out, h)
		}
	}
	return out
}

// waitCount waits until at least want records satisfy match and returns
// them.
func waitCount[E audit.Event](t testing.TB, r *recorder, want int, what string, match func(E) bool) []E {
	t.Helper()
	timer := time.NewTimer(waitLimit)
	defer timer.Stop()
	for {
		var got []E
		for _, e := range r.snapshot() {
			if ev, ok := e.(E); ok && match(ev) {
				got = append(got, ev)
			}
		}
		if len(got) >= want {
			return got
		}
		select {
		case <-r.notify:
		case <-timer.C:
			t.Fatalf("%d of %d %s records after %s", len(got), want, what, waitLimit)
			return nil
		}
	}
}

// converse pings through c and then ends it cleanly, returning the first
// error (for use off the test goroutine).
func converse(c *net.TCPConn, msg string) error {
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo %q, want %q", buf, msg)
	}
	if err := c.CloseWrite(); err != nil {
		return err
	}
	if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
		return fmt.Errorf("after half-close: %q, %w", rest, err)
	}
	return c.Close()
}

// TestPooledManyStreams: concurrent agent connections share one pooled
// connection: one handshake record on each side, one stream each, each
// audited (StreamAudit) with the pooled connection's serials.
func TestPooledManyStreams(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, tr string) {
		m := pooledMesh(t, tr, echo, func(c *proxy.Config) { c.StreamAudit = true })
		const n = 40
		errs := make(chan error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				c, err := net.Dial("tcp", m.a.RouteAddr(0).String())
				if err != nil {
					errs <- err
					return
				}
				_ = c.SetDeadline(time.Now().Add(waitLimit))
				errs <- converse(c.(*net.TCPConn), fmt.Sprintf("agent %d", i))
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		for _, side := range []struct {
			n   *node
			dir string
		}{{m.a, "outbound"}, {m.b, "inbound"}} {
			recs := waitCount(t, side.n.audit, n, "stream", func(c audit.Connection) bool { return c.Transport == tr })
			hs := handshakesOf(side.n, tr, side.dir)
			if len(hs) != 1 || hs[0].Result != "ok" {
				t.Fatalf("%s: %s handshake records %+v, want one ok", side.dir, tr, hs)
			}
			if tls := handshakesOf(side.n, "tls", side.dir); len(tls) != 0 {
				t.Errorf("%s: tls handshakes %+v on a %s route", side.dir, tls, tr)
			}
			for _, rec := range recs {
				if rec.Direction != side.dir || rec.Reason != "" || rec.LocalSerial != hs[0].LocalSerial ||
					rec.PeerSerial != hs[0].PeerSerial || rec.BytesIn == 0 || rec.BytesIn != rec.BytesOut {
					t.Errorf("%s: stream record %+v (handshake %+v)", side.dir, rec, hs[0])
				}
			}
			labels := map[string]string{"direction": side.dir, "transport": tr}
			if got := side.n.metric(t, "agentmesh_proxy_streams_total", labels); got != n {
				t.Errorf("%s: streams_total%v = %v, want %d", side.dir, labels, got, n)
			}
		}
		labels := map[string]string{"direction": "outbound", "transport": tr}
		if got := m.a.metric(t, "agentmesh_proxy_pool_connections", labels); got != 1 {
			t.Errorf("A pool_connections%v = %v, want 1", labels, got)
		}
	})
}

// TestPooledBulk: 16 MiB each way through one stream arrive intact (kept
// small enough for the race detector on a busy machine).
func TestPooledBulk(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, tr string) {
		m := pooledMesh(t, tr, echo, nil)
		const size = 16 << 20
		payload := make([]byte, size)
		_, _ = rand.Read(payload)
		c := m.dialRoute(t)
		writeErr := make(chan error, 1)
		go func() {
			_, err := c.Write(payload)
			if err == nil {
				err = c.CloseWrite()
			}
			writeErr <- err
		}()
		h := sha256.New()
		got, err := io.Copy(h, c)
		if err != nil {
			t.Fatalf("read echo: %v", err)
		}
		if err := <-writeErr; err != nil {
			t.Fatalf("write: %v", err)
		}
		if want := sha256.Sum256(payload); got != size || !bytes.Equal(h.Sum(nil), want[:]) {
			t.Fatalf("echo of %d bytes differs (got %d)", size, got)
		}
		if tr != proxy.TransportQUIC {
			return
		}
		// quic-go updates the keys of a connection after its first 100
		// packets, then every 100,000: each side counts the update,
		// as initiator or as peer.
		for _, n := range []*node{m.a, m.b} {
			if got := n.metric(t, "agentmesh_proxy_quic_key_updates_total", nil); got < 1 {
				t.Errorf("%s: quic_key_updates_total = %v after %d MiB, want >= 1", n.id, got, size>>20)
			}
		}
	})
}

// TestPooledHalfClose: the agent's half-close reaches the target, whose
// answer then comes back; and a target that speaks and closes first is
// seen to close by an agent that never half-closed.
func TestPooledHalfClose(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, tr string) {
		t.Run("agent_first", func(t *testing.T) {
			t.Parallel()
			m := pooledMesh(t, tr, func(c *net.TCPConn) {
				got, err := io.ReadAll(c)
				if err != nil {
					return
				}
				_, _ = fmt.Fprintf(c, "%d bytes", len(got))
				_ = c.CloseWrite()
			}, nil)
			c := m.dialRoute(t)
			if _, err := c.Write([]byte("everything I have to say")); err != nil {
				t.Fatal(err)
			}
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			if reply, err := io.ReadAll(c); err != nil || string(reply) != "24 bytes" {
				t.Fatalf("reply %q, %v", reply, err)
			}
		})
		t.Run("target_first", func(t *testing.T) {
			t.Parallel()
			m := pooledMesh(t, tr, func(c *net.TCPConn) {
				_, _ = c.Write([]byte("hello and goodbye"))
			}, func(c *proxy.Config) { c.StreamAudit = true })
			c := m.dialRoute(t)
			if got, err := io.ReadAll(c); err != nil || string(got) != "hello and goodbye" {
				t.Fatalf("read %q, %v", got, err)
			}
			_ = c.Close()
			for _, n := range []*node{m.a, m.b} {
				rec := waitFor(t, n.audit, "stream closed", func(c audit.Connection) bool { return c.Transport == tr })
				if rec.Reason != "" || rec.BytesIn+rec.BytesOut != int64(len("hello and goodbye")) {
					t.Errorf("%s: stream record %+v, want a clean close", n.id, rec)
				}
			}
		})
	})
}

// TestPooledStreamLimit: past PoolMaxStreams, new streams go to a second
// pooled connection (and handshake); the first keeps its streams.
func TestPooledStreamLimit(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, tr string) {
		m := pooledMesh(t, tr, echo, func(c *proxy.Config) { c.PoolMaxStreams = 2 })
		conns := []*net.TCPConn{m.connect(t, "one"), m.connect(t, "two")}
		if hs := handshakesOf(m.a, tr, "outbound"); len(hs) != 1 {
			t.Fatalf("%d handshakes for two streams, want 1", len(hs))
		}
		conns = append(conns, m.connect(t, "three"))
		if hs := handshakesOf(m.a, tr, "outbound"); len(hs) != 2 || hs[1].Result != "ok" {
			t.Fatalf("handshakes %+v for three streams, want 2", hs)
		}
		for i, c := range conns {
			if err := ping(t, c, "still there"); err != nil {
				t.Fatalf("stream %d: %v", i, err)
			}
			endCleanly(t, c)
		}
	})
}

// TestPooledRotation: after a rotation of A's SVID new streams go to a new
// pooled connection under the new certificate, while the old stream keeps
// working until Drain of the old serial closes it and its connection.
func TestPooledRotation(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, tr string) {
		m := pooledMesh(t, tr, echo, func(c *proxy.Config) { c.StreamAudit = true })
		oldSerial := m.a.serial(t)
		old := m.connect(t, "old")

		m.a.creds.Set(m.ca.SVID(t, idA))
		newSerial := m.a.serial(t)
		fresh := m.connect(t, "fresh")
		hs := handshakesOf(m.a, tr, "outbound")
		if len(hs) != 2 || hs[0].LocalSerial != oldSerial || hs[1].LocalSerial != newSerial {
			t.Fatalf("handshakes %+v, want one on %s then one on %s", hs, oldSerial, newSerial)
		}
		if err := ping(t, old, "old still works"); err != nil {
			t.Fatal(err)
		}
		pool := map[string]string{"direction": "outbound", "transport": tr}
		if got := m.a.metric(t, "agentmesh_proxy_pool_connections", pool); got != 2 {
			t.Fatalf("pool_connections = %v before the drain, want 2", got)
		}

		from := m.a.audit.len()
		if closed := m.a.Drain(t.Context(), oldSerial, 0); closed != 1 {
			t.Fatalf("Drain closed %d, want 1", closed)
		}
		rec := waitForFrom(t, m.a.audit, from, "drained stream", func(c audit.Connection) bool { return c.Reason == "drained" })
		if rec.LocalSerial != oldSerial || rec.Transport != tr {
			t.Errorf("drained stream record %+v", rec)
		}
		if _, err := io.ReadAll(old); err != nil {
			t.Logf("drained agent connection ended with %v", err) // a reset is fine too
		}
		if got := m.a.metric(t, "agentmesh_proxy_pool_connections", pool); got != 1 {
			t.Errorf("pool_connections = %v after the drain, want 1", got)
		}
		if err := ping(t, fresh, "fresh unaffected"); err != nil {
			t.Fatal(err)
		}
		again := m.connect(t, "after the drain")
		if hs := handshakesOf(m.a, tr, "outbound"); len(hs) != 2 {
			t.Errorf("%d handshakes, want the new connection reused", len(hs))
		}
		endCleanly(t, again)
		endCleanly(t, fresh)
	})
}

// TestPooledDenyPeer: when A's deny-list denies B, every stream to B and
// every pooled connection to B close at once, and B is refused from then on.
func TestPooledDenyPeer(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, tr string) {
		m := pooledMesh(t, tr, echo, nil)
		conns := []*net.TCPConn{m.connect(t, "one"), m.connect(t, "two")}
		if closed := m.a.SetDenyList(deny(idB)); closed != 2 {
			t.Fatalf("SetDenyList closed %d, want 2", closed)
		}
		labels := map[string]string{"direction": "outbound", "transport": tr}
		if got := m.a.metric(t, "agentmesh_proxy_pool_connections", labels); got != 0 {
			t.Errorf("pool_connections%v = %v after the deny-list, want 0", labels, got)
		}
		for _, c := range conns {
			if _, err := io.ReadAll(c); err != nil {
				t.Logf("revoked agent connection ended with %v", err)
			}
		}
		if got := m.a.metric(t, "agentmesh_proxy_connections_revoked_total", map[string]string{"direction": "outbound"}); got != 2 {
			t.Errorf("connections_revoked_total = %v, want 2", got)
		}
	})
}

// TestPooledRefusedStream: a stream for a port B does not serve is refused
// (status 403 or byte 0x01) and recorded on both sides, whatever
// StreamAudit says; the pooled connection carries on.
func TestPooledRefusedStream(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, tr string) {
		m := pooledMesh(t, tr, echo, nil)
		ok := m.connect(t, "allowed")
		peerB := m.b.TunnelAddr().String()
		a2 := start(t, m.ca, idA, proxy.Config{
			Transports: []string{tr},
			Routes: []proxy.Route{{Listen: "127.0.0.1:0", Peer: peerB, PeerID: idB, TargetPort: m.target.port + 1,
				Transport: tr}},
		})
		c, err := net.Dial("tcp", a2.RouteAddr(0).String())
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(waitLimit))
		_, _ = c.Write([]byte("must not arrive"))
		if got, _ := io.ReadAll(c); len(got) != 0 {
			t.Fatalf("agent got %q through a refused stream", got)
		}
		_ = c.Close()
		inRec := waitFor(t, m.b.audit, "refused stream", func(c audit.Connection) bool { return c.Reason != "" })
		outRec := waitFor(t, a2.audit, "refused stream", func(c audit.Connection) bool { return c.Reason != "" })
		if inRec.Reason != string(proxy.ReasonPortNotMeshed) || inRec.Transport != tr || inRec.PeerID != idA.String() {
			t.Errorf("B's record %+v, want port_not_meshed", inRec)
		}
		if outRec.Reason != string(proxy.ReasonPeerRefused) || outRec.Transport != tr || outRec.PeerID != idB.String() {
			t.Errorf("A's record %+v, want peer_refused", outRec)
		}
		if got := a2.metric(t, "agentmesh_proxy_streams_total", map[string]string{"result": "refused"}); got != 1 {
			t.Errorf("A streams_total{refused} = %v, want 1", got)
		}
		if hs := handshakesOf(a2, tr, "outbound"); len(hs) != 1 || hs[0].Result != "ok" {
			t.Errorf("A's handshakes %+v: the pooled connection itself was accepted", hs)
		}
		if err := ping(t, ok, "unaffected"); err != nil {
			t.Fatal(err)
		}
		endCleanly(t, ok)
	})
}

// TestPooledPeerRefusesHandshake: B does not allow A at all: the pooled
// connection's handshake is refused, recorded once on each side, and the
// agent connection fails with the same reason.
func TestPooledPeerRefusesHandshake(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, tr string) {
		ca := testca.New(t)
		tg := startTarget(t, echo)
		b := start(t, ca, idB, proxy.Config{
			Transports: []string{tr},
			Services:   []proxy.Service{{Port: tg.port, Allow: []spiffeid.ID{idC}}},
		})
		a := start(t, ca, idA, proxy.Config{
			Transports: []string{tr},
			Routes: []proxy.Route{{Listen: "127.0.0.1:0", Peer: b.TunnelAddr().String(), PeerID: idB,
				TargetPort: tg.port, Transport: tr}},
		})
		c, err := net.Dial("tcp", a.RouteAddr(0).String())
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(waitLimit))
		if got, _ := io.ReadAll(c); len(got) != 0 {
			t.Fatalf("agent got %q", got)
		}
		in := waitFor(t, b.audit, "refused handshake", func(h audit.Handshake) bool { return h.Result != "ok" })
		out := waitFor(t, a.audit, "refused handshake", func(h audit.Handshake) bool { return h.Result != "ok" })
		if in.Reason != string(proxy.ReasonPeerNotAllowed) || in.Transport != tr {
			t.Errorf("B's handshake record %+v, want peer_not_allowed", in)
		}
		if out.Reason != string(proxy.ReasonPeerRefused) || out.Transport != tr {
			t.Errorf("A's handshake record %+v, want peer_refused", out)
		}
		rec := waitFor(t, a.audit, "failed stream", func(c audit.Connection) bool { return true })
		if rec.Reason != string(proxy.ReasonPeerRefused) {
			t.Errorf("A's stream record %+v, want peer_refused", rec)
		}
	})
}

// TestTransportChoice: a captured connection takes the first of A's
// transports that the Directory says the peer accepts, else tls.
func TestTransportChoice(t *testing.T) {
	t.Parallel()
	all := append([]string{proxy.TransportTLS}, pooledTransports...)
	tests := []struct {
		name    string
		ours    []string
		accepts []string
		want    string
	}{
		{name: "peer_lists_nothing", ours: []string{"h2", "tls"}, accepts: nil, want: "tls"},
		{name: "peer_tls_only", ours: []string{"h2", "tls"}, accepts: []string{"tls"}, want: "tls"},
		{name: "h2", ours: []string{"h2", "tls"}, accepts: []string{"tls", "h2"}, want: "h2"},
		{name: "we_prefer_tls", ours: []string{"tls", "h2"}, accepts: []string{"h2"}, want: "tls"},
		{name: "quic", ours: []string{"quic", "h2", "tls"}, accepts: []string{"h2", "quic"}, want: "quic"},
		{name: "peer_without_quic", ours: []string{"quic", "h2", "tls"}, accepts: []string{"tls", "h2"}, want: "h2"},
		{name: "peer_without_either", ours: []string{"quic", "h2", "tls"}, accepts: []string{"tls"}, want: "tls"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ca := testca.New(t)
			tg := startTarget(t, echo)
			b := start(t, ca, idB, proxy.Config{
				Transports: all,
				Services:   []proxy.Service{{Port: tg.port, Allow: []spiffeid.ID{idA}}},
			})
			peer := proxy.Peer{ID: idB, Tunnel: b.TunnelAddr().String(), Transports: tc.accepts}
			a := start(t, ca, idA, proxy.Config{
				Transports: tc.ours,
				Explicit:   "127.0.0.1:0",
				Directory:  staticDirectory{netip.MustParseAddr("127.0.0.1"): peer},
			})
			c, err := net.Dial("tcp", a.ExplicitAddr().String())
			if err != nil {
				t.Fatal(err)
			}
			_ = c.SetDeadline(time.Now().Add(waitLimit))
			defer func() { _ = c.Close() }()
			_, _ = c.Write(socksGreeting)
			expect(t, c, socksNoAuth)
			_, _ = c.Write(socksConnectIP(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), tg.port)))
			expect(t, c, socksSucceeded)
			if err := ping(t, c, "chosen"); err != nil {
				t.Fatal(err)
			}
			h := waitFor(t, b.audit, "inbound handshake", func(h audit.Handshake) bool { return h.Result == "ok" })
			if h.Transport != tc.want {
				t.Fatalf("B accepted a %s connection, want %s", h.Transport, tc.want)
			}
		})
	}
}

// TestPooledSecurityEvent: after ResetTicketKeys on either side, the next
// agent connection makes a new handshake (a pooled connection must not
// carry new streams across a security event) while the open stream goes on.
func TestPooledSecurityEvent(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, tr string) {
		for _, side := range []string{"a", "b"} {
			t.Run(side, func(t *testing.T) {
				t.Parallel()
				m := pooledMesh(t, tr, echo, nil)
				open := m.connect(t, "before")
				n := m.a
				if side == "b" {
					n = m.b
				}
				n.ResetTicketKeys("policy")
				if side == "b" {
					// The GOAWAY (h2) or control message (quic) travels
					// while A may already open the next stream; the
					// one after it goes to a new connection for sure.
					endCleanly(t, m.connect(t, "racing the goaway"))
				}
				after := m.connect(t, "after")
				if hs := handshakesOf(m.a, tr, "outbound"); len(hs) != 2 {
					t.Fatalf("%d handshakes, want a new one after the reset", len(hs))
				}
				if err := ping(t, open, "still open"); err != nil {
					t.Fatal(err)
				}
				endCleanly(t, after)
				endCleanly(t, open)
			})
		}
	})
}

// TestPooledRevocationStale: while a proxy's deny-list is stale, streams
// fail closed as handshakes do, on either side, over a pooled connection
// established while it was fresh.
func TestPooledRevocationStale(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, tr string) {
		for _, side := range []string{"outbound", "inbound"} {
			t.Run(side, func(t *testing.T) {
				t.Parallel()
				var stale atomic.Bool
				m := pooledMesh(t, tr, echo, func(c *proxy.Config) {
					if isA := len(c.Routes) > 0; isA == (side == "outbound") {
						c.Revocation = func() error {
							if stale.Load() {
								return errTest
							}
							return nil
						}
					}
				})
				endCleanly(t, m.connect(t, "fresh"))
				stale.Store(true)
				n := m.a
				if side == "inbound" {
					n = m.b
				}
				from := n.audit.len()
				c := m.dialRoute(t)
				_, _ = c.Write([]byte("must not arrive"))
				if got, _ := io.ReadAll(c); len(got) != 0 {
					t.Fatalf("agent got %q while the deny-list is stale", got)
				}
				rec := waitForFrom(t, n.audit, from, "stale", func(c audit.Connection) bool { return c.Reason != "" })
				if rec.Reason != string(proxy.ReasonRevocationStale) || rec.Direction != side || rec.Transport != tr {
					t.Fatalf("record %+v, want revocation_stale", rec)
				}
			})
		}
	})
}

// TestPooledServerRotation: after B's SVID rotates, B serves the next
// stream on the old connection but asks A to open no more there; the one
// after goes to a new connection, and Drain of B's old serial closes the
// streams of the old connection only.
func TestPooledServerRotation(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, tr string) {
		m := pooledMesh(t, tr, echo, nil)
		oldSerial := m.b.serial(t)
		old := m.connect(t, "old")
		m.b.creds.Set(m.ca.SVID(t, idB))
		asked := m.connect(t, "served on the old connection, asks A to move")
		fresh := m.connect(t, "fresh")
		hs := handshakesOf(m.a, tr, "outbound")
		if len(hs) != 2 || hs[0].PeerSerial != oldSerial || hs[1].PeerSerial != m.b.serial(t) {
			t.Fatalf("A's handshakes %+v, want one with B's old serial, then one with its new", hs)
		}
		if closed := m.b.Drain(t.Context(), oldSerial, 0); closed != 2 {
			t.Fatalf("Drain closed %d, want 2", closed)
		}
		for _, c := range []*net.TCPConn{old, asked} {
			if _, err := io.ReadAll(c); err != nil {
				t.Logf("drained agent connection ended with %v", err)
			}
		}
		if err := ping(t, fresh, "fresh unaffected"); err != nil {
			t.Fatal(err)
		}
		endCleanly(t, fresh)
	})
}

// TestQUICWithMark: the UDP socket of the quic transport takes Config.Mark
// like every socket the proxy dials (that iptables then skips it is
// TestTransparentLoopback's subject for TCP), and carries streams.
func TestQUICWithMark(t *testing.T) {
	t.Parallel()
	if runtime.GOOS != "linux" || os.Geteuid() != 0 {
		t.Skip("SO_MARK needs Linux and CAP_NET_ADMIN")
	}
	m := pooledMesh(t, proxy.TransportQUIC, echo, func(c *proxy.Config) { c.Mark = 0x2a })
	endCleanly(t, m.connect(t, "marked"))
}
