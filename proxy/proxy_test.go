package proxy_test

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/proxy"
)

func TestNewValidates(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	creds := testca.NewCredentials(ca, ca.SVID(t, idA))
	valid := func() proxy.Config {
		return proxy.Config{
			ID:           idA,
			Credentials:  creds,
			TunnelListen: "127.0.0.1:0",
			Routes:       []proxy.Route{{Listen: "127.0.0.1:0", Peer: "127.0.0.1:15008", PeerID: idB, TargetPort: 80}},
			Services:     []proxy.Service{{Port: 80, Allow: []spiffeid.ID{idB}}},
		}
	}
	tests := []struct {
		name   string
		mutate func(*proxy.Config)
	}{
		{name: "no_id", mutate: func(c *proxy.Config) { c.ID = spiffeid.ID{} }},
		{name: "no_credentials", mutate: func(c *proxy.Config) { c.Credentials = nil }},
		{name: "negative_handshake_timeout", mutate: func(c *proxy.Config) { c.HandshakeTimeout = -time.Second }},
		{name: "negative_dial_timeout", mutate: func(c *proxy.Config) { c.DialTimeout = -time.Second }},
		{name: "negative_max_connections", mutate: func(c *proxy.Config) { c.MaxConnections = -1 }},
		{name: "negative_ticket_key_period", mutate: func(c *proxy.Config) { c.TicketKeyPeriod = -time.Minute }},
		{name: "route_without_listen", mutate: func(c *proxy.Config) { c.Routes[0].Listen = "" }},
		{name: "route_without_peer_id", mutate: func(c *proxy.Config) { c.Routes[0].PeerID = spiffeid.ID{} }},
		{name: "route_without_target_port", mutate: func(c *proxy.Config) { c.Routes[0].TargetPort = 0 }},
		{name: "route_peer_without_port", mutate: func(c *proxy.Config) { c.Routes[0].Peer = "10.0.0.1" }},
		{name: "service_port_zero", mutate: func(c *proxy.Config) { c.Services[0].Port = 0 }},
		{name: "service_twice", mutate: func(c *proxy.Config) { c.Services = append(c.Services, c.Services[0]) }},
		{name: "service_empty_allow", mutate: func(c *proxy.Config) { c.Services[0].Allow = nil }},
		{name: "service_zero_id", mutate: func(c *proxy.Config) { c.Services[0].Allow = []spiffeid.ID{{}} }},
		{name: "unknown_transport", mutate: func(c *proxy.Config) { c.Transports = []string{"h3"} }},
		{name: "transport_twice", mutate: func(c *proxy.Config) { c.Transports = []string{"h2", "tls", "h2"} }},
		{name: "route_unknown_transport", mutate: func(c *proxy.Config) { c.Routes[0].Transport = "tcp" }},
		{name: "route_transport_not_offered", mutate: func(c *proxy.Config) { c.Routes[0].Transport = proxy.TransportQUIC }},
		{name: "negative_pool_max_streams", mutate: func(c *proxy.Config) { c.PoolMaxStreams = -1 }},
		{name: "negative_pool_max_bytes", mutate: func(c *proxy.Config) { c.PoolMaxBytes = -1 }},
		{name: "negative_pool_idle_timeout", mutate: func(c *proxy.Config) { c.PoolIdleTimeout = -time.Second }},
		{name: "pool_max_streams_too_large", mutate: func(c *proxy.Config) { c.PoolMaxStreams = 1 << 16 }},
		{name: "negative_pool_max_lifetime", mutate: func(c *proxy.Config) { c.PoolMaxLifetime = -time.Second }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := valid()
			tc.mutate(&cfg)
			if _, err := proxy.New(cfg); !errors.Is(err, proxy.ErrInvalidConfig) {
				t.Fatalf("New error = %v, want ErrInvalidConfig", err)
			}
		})
	}
	t.Run("valid", func(t *testing.T) {
		t.Parallel()
		p, err := proxy.New(valid())
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Close(); err != nil {
			t.Fatal(err)
		}
	})
}

func TestNewReleasesOnFailure(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	reg := prometheus.NewRegistry()
	cfg := proxy.Config{
		ID:           idA,
		Credentials:  testca.NewCredentials(ca, ca.SVID(t, idA)),
		TunnelListen: "127.0.0.1:0",
		Registerer:   reg,
	}
	first, err := proxy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = first.Close() })
	// Same registry: the metrics collide, New fails and releases its port.
	cfg.TunnelListen = "127.0.0.1:0"
	if _, err := proxy.New(cfg); err == nil {
		t.Fatal("second New on the same Registerer succeeded")
	}
	// The tunnel port of a failed New is free again.
	cfg.TunnelListen = first.TunnelAddr().String()
	cfg.Registerer = nil
	if _, err := proxy.New(cfg); err == nil {
		t.Fatal("New on a port in use succeeded")
	}
}

func TestRunTwice(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	p, err := proxy.New(proxy.Config{ID: idA, Credentials: testca.NewCredentials(ca, ca.SVID(t, idA)), TunnelListen: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel() // Run returns at once
	if err := p.Run(ctx); err != nil {
		t.Fatalf("first Run = %v", err)
	}
	if err := p.Run(ctx); !errors.Is(err, proxy.ErrAlreadyStarted) {
		t.Fatalf("second Run = %v, want ErrAlreadyStarted", err)
	}
}

func TestReady(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	n := start(t, ca, idA, proxy.Config{})
	if err := n.Ready(); err != nil {
		t.Fatalf("Ready = %v", err)
	}
	n.creds.Set(nil)
	if err := n.Ready(); !errors.Is(err, proxy.ErrNoSVID) {
		t.Fatalf("Ready without SVID = %v, want ErrNoSVID", err)
	}
	n.creds.Set(ca.SVID(t, idA))
	n.audit.fail(errTest)
	if err := n.Ready(); !errors.Is(err, proxy.ErrAuditUnavailable) || !errors.Is(err, errTest) {
		t.Fatalf("Ready with a failed audit log = %v, want ErrAuditUnavailable wrapping the cause", err)
	}
}

// TestAuditUnavailableRefuses: with the audit log failed, neither side lets a
// handshake through, and the refusals are still counted.
func TestAuditUnavailableRefuses(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		failing func(*mesh) *node
		dir     string
	}{
		{name: "inbound", failing: func(m *mesh) *node { return m.b }, dir: "inbound"},
		{name: "outbound", failing: func(m *mesh) *node { return m.a }, dir: "outbound"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			m := newMesh(t, echo)
			n := tc.failing(m)
			n.audit.fail(errTest)
			c := m.dialRoute(t)
			_, _ = c.Write([]byte("must not arrive"))
			if got, _ := io.ReadAll(c); len(got) != 0 {
				t.Fatalf("agent got %q through a proxy whose audit log failed", got)
			}
			if tc.dir == "inbound" {
				// A saw B hang up before any TLS.
				waitFor(t, m.a.audit, "peer_closed", func(h audit.Handshake) bool { return h.Reason == string(proxy.ReasonPeerClosed) })
			}
			labels := map[string]string{"direction": tc.dir, "result": "error"}
			if got := n.metric(t, "agentmesh_proxy_handshakes_total", labels); got != 1 {
				t.Fatalf("handshakes_total%v = %v, want 1", labels, got)
			}
		})
	}
}

// TestMaxConnections: with one slot, a second connection is refused at once
// (counted, and aggregated with the refusals of its source) while the first
// is served, and the slot is free again once the first ends.
func TestMaxConnections(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	tg := startTarget(t, echo)
	b := start(t, ca, idB, proxy.Config{
		Services:        []proxy.Service{{Port: tg.port, Allow: []spiffeid.ID{idA}}},
		MaxConnections:  1,
		RefusalInterval: 20 * time.Millisecond,
	})
	a := start(t, ca, idA, proxy.Config{
		Routes: []proxy.Route{{Listen: "127.0.0.1:0", Peer: b.TunnelAddr().String(), PeerID: idB, TargetPort: tg.port}},
	})
	m := &mesh{ca: ca, a: a, b: b, target: tg}
	first := m.dialRoute(t)
	if err := ping(t, first, "first"); err != nil {
		t.Fatalf("first connection: %v", err)
	}
	second := m.dialRoute(t)
	if got, _ := io.ReadAll(second); len(got) != 0 {
		t.Fatalf("second connection got %q past the limit", got)
	}
	rec := waitFor(t, b.audit, "max_connections", func(r audit.Refusals) bool { return r.Reasons[string(proxy.ReasonMaxConnections)] > 0 })
	if rec.Source != "127.0.0.1" || rec.Direction != "inbound" {
		t.Errorf("refusals record %+v", rec)
	}
	if got := b.metric(t, "agentmesh_proxy_connections_refused_total", map[string]string{"reason": "max_connections"}); got < 1 {
		t.Errorf("connections_refused_total{reason=max_connections} = %v, want >= 1", got)
	}
	_ = first.Close()
	// The slot is released when B's handler for the first connection ends,
	// which B learns from A a moment later: retry until then.
	deadline := time.After(waitLimit)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		err := ping(t, m.dialRoute(t), "after the first ended")
		if err == nil {
			break
		}
		select {
		case <-deadline:
			t.Fatalf("no connection %s after the first ended: %v", waitLimit, err)
		case <-tick.C:
		}
	}
}
