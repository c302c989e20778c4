package proxy_test

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/proxy"
)

// routeMesh is a policyMesh whose B serves its targets to A, and A's routes
// as a slice to hand to SetRoutes.
func routeMesh(t *testing.T, n int) (*policyMesh, []proxy.Route) {
	t.Helper()
	m := newPolicyMesh(t, n, func(c *proxy.Config, m *policyMesh) {
		for _, tg := range m.targets {
			c.Services = append(c.Services, proxy.Service{Port: tg.port, Allow: []spiffeid.ID{idA}})
		}
	}, nil)
	var routes []proxy.Route
	for i := range n {
		routes = append(routes, proxy.Route{Listen: "127.0.0.1:0", Peer: m.b.TunnelAddr().String(), PeerID: idB, TargetPort: m.port(i)})
	}
	return m, routes
}

// toPort matches a connection record whose target is port.
func toPort(port uint16) func(audit.Connection) bool {
	return func(c audit.Connection) bool { return strings.HasSuffix(c.Target, fmt.Sprintf(":%d", port)) }
}

// TestSetRoutes: a route added carries traffic at once; a route kept keeps
// its listener and its connections, which see no failure; a removed route
// stops accepting and its connection, still open when the grace ends, is
// drained (recorded "drained", counted).
func TestSetRoutes(t *testing.T) {
	t.Parallel()
	m, routes := routeMesh(t, 3)
	keepAddr := m.a.RouteAddr(0).String()
	keep := m.open(t, 0)
	gone := m.open(t, 1)
	goneAddr := m.a.RouteAddr(1).String()
	m.a.SetDrainGrace(time.Millisecond)

	from := m.a.audit.len()
	// Route 1 goes, route 2 comes.
	if err := m.a.SetRoutes([]proxy.Route{routes[0], routes[2]}); err != nil {
		t.Fatal(err)
	}
	if got := m.a.RouteAddr(0).String(); got != keepAddr {
		t.Errorf("kept route listens on %s, was %s", got, keepAddr)
	}
	added := m.open(t, 1) // the new route, second in the set
	rec := waitForFrom(t, m.a.audit, from, "the removed route's connection", toPort(m.port(1)))
	if rec.Reason != "drained" {
		t.Errorf("removed route's connection record %+v, want reason drained", rec)
	}
	closedByPeer(t, gone, "the removed route's connection")
	if got := m.a.metric(t, "agentmesh_proxy_connections_drained_total", map[string]string{"direction": "outbound"}); got != 1 {
		t.Errorf("connections_drained_total{outbound} = %v, want 1", got)
	}
	if c, err := net.Dial("tcp", goneAddr); err == nil {
		_ = c.Close()
		t.Errorf("the removed route's listener %s still accepts", goneAddr)
	}

	for what, c := range map[string]*net.TCPConn{"kept route": keep, "added route": added} {
		if err := ping(t, c, what); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		endCleanly(t, c)
	}
	for _, port := range []uint16{m.port(0), m.port(2)} {
		if rec := waitForFrom(t, m.a.audit, from, "a connection that ended by itself", toPort(port)); rec.Reason != "" {
			t.Errorf("connection record %+v, want a clean end", rec)
		}
	}
}

// TestSetRoutesGrace: a removed route's connection that ends within the grace
// keeps carrying bytes until then and ends as it likes; so does one of a route
// whose settings changed at the same address, whose listener then serves the
// new settings.
func TestSetRoutesGrace(t *testing.T) {
	t.Parallel()
	m, routes := routeMesh(t, 2)
	m.a.SetDrainGrace(time.Hour) // never ends while the test runs
	// A fixed address, so that the route keeps it while its target changes.
	routes[0].Listen = m.a.RouteAddr(0).String()
	if err := m.a.SetRoutes(routes); err != nil {
		t.Fatal(err)
	}
	old := m.open(t, 0) // to target 0
	retargeted := routes[0]
	retargeted.TargetPort = m.port(1)
	from := m.a.audit.len()
	if err := m.a.SetRoutes([]proxy.Route{retargeted}); err != nil {
		t.Fatal(err)
	}
	if got := m.a.RouteAddr(0).String(); got != routes[0].Listen {
		t.Errorf("retargeted route listens on %s, want %s", got, routes[0].Listen)
	}
	if err := ping(t, old, "within the grace"); err != nil {
		t.Fatalf("a draining connection: %v", err)
	}
	fresh := m.open(t, 0)
	endCleanly(t, fresh)
	if rec := waitForFrom(t, m.a.audit, from, "the new settings' connection", toPort(m.port(1))); rec.Reason != "" {
		t.Errorf("new connection record %+v, want a clean end to target 1", rec)
	}
	endCleanly(t, old)
	if rec := waitForFrom(t, m.a.audit, from, "the old settings' connection", toPort(m.port(0))); rec.Reason != "" {
		t.Errorf("draining connection record %+v, want a clean end", rec)
	}
}

// TestSetRoutesInvalid: an invalid route set, or one whose listener cannot be
// bound, changes nothing.
func TestSetRoutesInvalid(t *testing.T) {
	t.Parallel()
	m, routes := routeMesh(t, 1)
	addr := m.a.RouteAddr(0).String()
	keep := m.open(t, 0)
	noPeerID := proxy.Route{Listen: "127.0.0.1:0", Peer: routes[0].Peer, TargetPort: m.port(0)}
	if err := m.a.SetRoutes([]proxy.Route{noPeerID}); !errors.Is(err, proxy.ErrInvalidConfig) {
		t.Errorf("SetRoutes without a PeerID: %v, want ErrInvalidConfig", err)
	}
	taken := routes[0]
	taken.Listen = m.b.TunnelAddr().String() // in use
	if err := m.a.SetRoutes([]proxy.Route{taken}); err == nil {
		t.Error("SetRoutes on an address in use succeeded")
	}
	if got := m.a.RouteAddr(0).String(); got != addr {
		t.Errorf("route listens on %s after refused sets, want %s", got, addr)
	}
	if err := ping(t, keep, "after refused sets"); err != nil {
		t.Fatal(err)
	}
	_ = m.open(t, 0)
}

// TestSetServices: narrowing a Service's allow list closes the live
// connection of the identity removed (audited as a closure, recorded
// policy_revoked), refuses its next tunnel, resumed or not, and leaves the
// other identity's connection alone; an invalid set changes nothing.
func TestSetServices(t *testing.T) {
	t.Parallel()
	tr := newTriangle(t)
	port := tr.target.port

	for _, bad := range [][]proxy.Service{
		{{Port: port}},
		{{Port: 0, Allow: []spiffeid.ID{idA}}},
		{{Port: port, Allow: []spiffeid.ID{idA}}, {Port: port, Allow: []spiffeid.ID{idC}}},
	} {
		if _, err := tr.b.SetServices(bad); !errors.Is(err, proxy.ErrInvalidConfig) {
			t.Errorf("SetServices(%v): %v, want ErrInvalidConfig", bad, err)
		}
	}
	if err := ping(t, tr.fromC, "after refused sets"); err != nil {
		t.Fatalf("C after refused sets: %v", err)
	}

	from := tr.b.audit.len()
	closed, err := tr.b.SetServices([]proxy.Service{{Port: port, Allow: []spiffeid.ID{idA}}})
	if err != nil {
		t.Fatal(err)
	}
	if closed != 1 {
		t.Errorf("SetServices closed %d connections, want 1", closed)
	}
	az := waitForFrom(t, tr.b.audit, from, "closure", func(a audit.Authorization) bool { return a.Result == "closed" })
	if az.SrcID != idC.String() || az.Port != port {
		t.Errorf("authorization record %+v, want C's closure at port %d", az, port)
	}
	rec := waitForFrom(t, tr.b.audit, from, "C's connection", func(c audit.Connection) bool { return c.PeerID == idC.String() })
	if rec.Reason != "policy_revoked" {
		t.Errorf("C's connection record %+v, want reason policy_revoked", rec)
	}
	closedByPeer(t, tr.fromC, "C's connection")

	// C has a session ticket from B: refused, resumed or not.
	from = tr.b.audit.len()
	c, err := net.Dial("tcp", tr.c.RouteAddr(0).String())
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(waitLimit))
	closedByPeer(t, c.(*net.TCPConn), "C's new connection")
	if h := nextHandshake(t, tr.b, from); h.PeerID != idC.String() || h.Reason != string(proxy.ReasonPeerNotAllowed) {
		t.Errorf("B's record for C's new tunnel %+v, want %s", h, proxy.ReasonPeerNotAllowed)
	}

	if err := ping(t, tr.fromA, "A after the change"); err != nil {
		t.Fatalf("A's connection: %v", err)
	}
	_ = tr.connect(t, "A's new connection")
}
