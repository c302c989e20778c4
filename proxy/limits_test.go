package proxy_test

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/proxy"
)

// TestRefusalsAggregated: garbage from five source addresses, two attempts each, costs
// one record per source up to RefusalSources and one "other" record for the rest, no
// handshake record of its own, and is still counted attempt by attempt.
func TestRefusalsAggregated(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	b := start(t, ca, idB, proxy.Config{RefusalSources: 2, RefusalInterval: time.Hour})
	for _, src := range []string{"127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"} {
		for range 2 {
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: waitLimit}
			c, err := d.Dial("tcp", b.TunnelAddr().String())
			if err != nil {
				t.Fatal(err)
			}
			_ = c.SetDeadline(time.Now().Add(waitLimit))
			_, _ = c.Write([]byte("GET / HTTP/1.1\r\n\r\n"))
			_, _ = io.Copy(io.Discard, c)
			_ = c.Close()
		}
	}
	// Counted before the connection is closed.
	labels := map[string]string{"direction": "inbound", "result": "refused"}
	if got := b.metric(t, "agentmesh_proxy_handshakes_total", labels); got != 10 {
		t.Errorf("handshakes_total%v = %v, want 10", labels, got)
	}
	b.stop() // the last interval is written at shutdown

	var got []audit.Refusals
	for _, e := range b.audit.snapshot() {
		switch r := e.(type) {
		case audit.Refusals:
			got = append(got, r)
		case audit.Handshake:
			t.Errorf("a refusal before authentication has its own record: %+v", r)
		}
	}
	want := []struct {
		source string
		count  uint64
	}{{"127.0.0.2", 2}, {"127.0.0.3", 2}, {"other", 6}}
	if len(got) != len(want) {
		t.Fatalf("records %+v, want %v", got, want)
	}
	for i, w := range want {
		r := got[i]
		if r.Source != w.source || r.Count != w.count || r.Reasons[string(proxy.ReasonNotTLS)] != w.count ||
			r.Transports[proxy.TransportTLS] != w.count || r.Last.Before(r.First) {
			t.Errorf("record %d = %+v, want source %s with %d not_tls attempts", i, r, w.source, w.count)
		}
	}
}

// TestMaxHandshakes: a peer that has started its handshake holds a slot; with one slot a
// second one is refused at once, counted, while a silent connection holds none.
func TestMaxHandshakes(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	tg := startTarget(t, echo)
	b := start(t, ca, idB, proxy.Config{
		Services:      []proxy.Service{{Port: tg.port, Allow: []spiffeid.ID{idA}}},
		MaxHandshakes: 1,
	})
	tunnel := b.TunnelAddr().String()
	dial := func(first []byte) net.Conn {
		c, err := net.Dial("tcp", tunnel)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close() })
		_ = c.SetDeadline(time.Now().Add(waitLimit))
		if len(first) > 0 {
			if _, err := c.Write(first); err != nil {
				t.Fatal(err)
			}
		}
		return c
	}
	dial(nil)                // silent: no handshake slot
	dial([]byte{0x16, 0x03}) // the start of a TLS record, then nothing: holds the slot
	refused := dial([]byte{0x16})
	if _, err := refused.Read(make([]byte, 1)); err == nil {
		t.Fatal("the second handshake got an answer past MaxHandshakes 1")
	}
	assertRefused(t, b, proxy.ReasonMaxHandshakes)
	waitFor(t, b.audit, "max_handshakes", func(r audit.Refusals) bool { return r.Reasons[string(proxy.ReasonMaxHandshakes)] == 1 })
}

// TestQUICMaxConnections: quic connections count against MaxConnections with the TCP
// ones; over it quic-go refuses the connection before its handshake, counted and
// aggregated like any refusal before authentication.
func TestQUICMaxConnections(t *testing.T) {
	t.Parallel()
	m := newMeshWith(t, echo, func(c *proxy.Config) {
		c.Transports = []string{proxy.TransportQUIC}
		for i := range c.Routes {
			c.Routes[i].Transport = proxy.TransportQUIC
		}
		if len(c.Services) > 0 {
			c.MaxConnections = 2 // B: the pooled connection and one stream
		}
	})
	c := m.dialRoute(t)
	if err := ping(t, c, "holds both slots"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), waitLimit)
	defer cancel()
	_, err := quic.DialAddr(ctx, m.b.TunnelAddr().String(), &tls.Config{
		InsecureSkipVerify: true, //nolint:gosec,forbidigo // the server refuses before any certificate
		NextProtos:         []string{proxy.ALPNQUIC},
	}, nil)
	if err == nil {
		t.Fatal("a quic connection was accepted past MaxConnections")
	}
	assertRefused(t, m.b, proxy.ReasonMaxConnections)
	rec := waitFor(t, m.b.audit, "max_connections", func(r audit.Refusals) bool { return r.Reasons[string(proxy.ReasonMaxConnections)] > 0 })
	if rec.Transports[proxy.TransportQUIC] == 0 {
		t.Errorf("record %+v, want transport quic", rec)
	}
	// The connection already served keeps working.
	if err := ping(t, c, "still served"); err != nil {
		t.Fatalf("the open connection after the refusal: %v", err)
	}
}

// assertRefused checks that a connection was refused for reason; the count is
// made before the connection is closed. (A quic client may try its Initial
// again after the refusal, and be refused again.)
func assertRefused(t *testing.T, n *node, reason proxy.Reason) {
	t.Helper()
	labels := map[string]string{"reason": string(reason)}
	if got := n.metric(t, "agentmesh_proxy_connections_refused_total", labels); got < 1 {
		t.Errorf("connections_refused_total%v = %v, want >= 1", labels, got)
	}
}
