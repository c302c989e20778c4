package proxy_test

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/proxy"
)

var (
	agentX = spiffeid.RequireFromString("spiffe://example.org/agent/x")
	agentY = spiffeid.RequireFromString("spiffe://example.org/agent/y")
)

// agentSet is a proxy.Agents over registrations a test makes, as the
// directory's entries would be; like them, they may change while a proxy
// runs.
type agentSet struct {
	mu     sync.Mutex
	byUID  map[uint32]agentEntry
	byPort map[uint16]spiffeid.ID
}

type agentEntry struct {
	id    spiffeid.ID
	creds proxy.Credentials
}

func newAgents() *agentSet {
	return &agentSet{byUID: map[uint32]agentEntry{}, byPort: map[uint16]spiffeid.ID{}}
}

// add registers id for uid, presenting creds.
func (s *agentSet) add(uid uint32, id spiffeid.ID, creds proxy.Credentials) *agentSet {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.byUID[uid] = agentEntry{id: id, creds: creds}
	return s
}

// listen registers id as listening on port.
func (s *agentSet) listen(port uint16, id spiffeid.ID) *agentSet {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.byPort[port] = id
	return s
}

func (s *agentSet) ByUID(uid uint32) (spiffeid.ID, proxy.Credentials, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.byUID[uid]
	return e.id, e.creds, ok
}

func (s *agentSet) ByPort(port uint16) (spiffeid.ID, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	id, ok := s.byPort[port]
	return id, ok
}

var _ proxy.Agents = (*agentSet)(nil)

// ownUID is the uid of this process, which owns the sockets a test dials.
func ownUID() uint32 { return uint32(os.Getuid()) } //nolint:gosec // uids fit in 32 bits

// agentMesh is A (a route to B, with agents) and B, whose Service lets the
// host identity of A and both agents reach the echo target.
func agentMesh(t testing.TB, agents *agentSet, cfg func(*proxy.Config)) *mesh {
	t.Helper()
	return newMeshWith(t, echo, func(c *proxy.Config) {
		if len(c.Services) > 0 {
			c.Services[0].Allow = []spiffeid.ID{idA, agentX, agentY}
		}
		if len(c.Routes) > 0 {
			c.Agents = agents
		}
		// These tests follow a connection from the agent's identity to
		// the host's and back; the refusing default has tests of its own.
		c.Unattested = proxy.UnattestedHost
		if cfg != nil {
			cfg(c)
		}
	})
}

// attestations reads agentmesh_proxy_attestations_total{result}.
func (n *node) attestations(t testing.TB, result string) float64 {
	t.Helper()
	return n.metric(t, "agentmesh_proxy_attestations_total", map[string]string{"result": result})
}

// TestAttestedIdentity: a connection from a process whose uid is a
// registered agent's presents that agent's SVID (B sees the agent's ID and
// records it), A records and lists it as the local identity, and once the
// registration is gone the host identity is presented again.
func TestAttestedIdentity(t *testing.T) {
	t.Parallel()
	agents := newAgents()
	m := agentMesh(t, agents, nil)
	agents.add(ownUID(), agentX, testca.NewCredentials(m.ca, m.ca.SVID(t, agentX)))

	fromA, fromB := m.a.audit.len(), m.b.audit.len()
	c := m.connect(t, "as agent x")
	in := nextHandshake(t, m.b, fromB)
	if in.Result != "ok" || in.PeerID != agentX.String() || in.LocalID != idB.String() {
		t.Errorf("B's record %+v, want ok from %s, presenting %s", in, agentX, idB)
	}
	out := nextHandshake(t, m.a, fromA)
	if out.Result != "ok" || out.LocalID != agentX.String() || out.PeerID != idB.String() {
		t.Errorf("A's record %+v, want ok presenting %s", out, agentX)
	}
	conns := m.a.Connections()
	if len(conns) != 1 || conns[0].LocalID != agentX || conns[0].PeerID != idB || conns[0].Port != m.target.port {
		t.Errorf("A's connections %+v, want one as %s to %s port %d", conns, agentX, idB, m.target.port)
	}
	_ = c.Close()
	rec := waitForFrom(t, m.a.audit, fromA, "A's connection record", func(audit.Connection) bool { return true })
	if rec.LocalID != agentX.String() || rec.PeerID != idB.String() {
		t.Errorf("A's connection record %+v, want local_id %s", rec, agentX)
	}
	if got := m.a.attestations(t, "agent"); got != 1 {
		t.Errorf("attestations{agent} = %v, want 1", got)
	}

	agents.mu.Lock()
	delete(agents.byUID, ownUID())
	agents.mu.Unlock()
	fromB = m.b.audit.len()
	_ = m.connect(t, "as the host").Close()
	if in := nextHandshake(t, m.b, fromB); in.PeerID != idA.String() {
		t.Errorf("B's record %+v after unregistering, want the host identity %s", in, idA)
	}
	if got := m.a.attestations(t, "host"); got != 1 {
		t.Errorf("attestations{host} = %v, want 1", got)
	}
}

// TestUnattested: a process that is no registered agent's is carried under
// the host identity (UnattestedHost) or refused before anything is dialed
// (UnattestedDeny), on a route and on explicit capture, which answers the
// refusal in its protocol.
func TestUnattested(t *testing.T) {
	t.Parallel()
	// Another uid's agent: this process is not one.
	other := ownUID() + 1
	t.Run("host", func(t *testing.T) {
		t.Parallel()
		agents := newAgents()
		m := agentMesh(t, agents, nil)
		agents.add(other, agentX, testca.NewCredentials(m.ca, m.ca.SVID(t, agentX)))
		from := m.b.audit.len()
		_ = m.connect(t, "unattested").Close()
		if in := nextHandshake(t, m.b, from); in.PeerID != idA.String() {
			t.Errorf("B's record %+v, want the host identity", in)
		}
		if got := m.a.attestations(t, "host"); got != 1 {
			t.Errorf("attestations{host} = %v, want 1", got)
		}
	})
	t.Run("deny_route", func(t *testing.T) {
		t.Parallel()
		agents := newAgents()
		m := agentMesh(t, agents, func(c *proxy.Config) { c.Unattested = proxy.UnattestedDeny })
		agents.add(other, agentX, testca.NewCredentials(m.ca, m.ca.SVID(t, agentX)))
		from := m.a.audit.len()
		c := m.dialRoute(t)
		_, _ = c.Write([]byte("must not arrive"))
		if got, _ := io.ReadAll(c); len(got) != 0 {
			t.Fatalf("agent got %q through a refused route", got)
		}
		rec := waitForFrom(t, m.a.audit, from, "unattested", func(h audit.Handshake) bool { return h.Reason == string(proxy.ReasonUnattested) })
		if rec.Result != "refused" || rec.Transport != "none" {
			t.Errorf("A's record %+v, want refused before any dial", rec)
		}
		if got := m.a.attestations(t, "refused"); got != 1 {
			t.Errorf("attestations{refused} = %v, want 1", got)
		}
		if got := m.b.metric(t, "agentmesh_proxy_handshakes_total", nil); got != 0 {
			t.Errorf("B counted %v handshakes, want none", got)
		}
	})
	t.Run("deny_explicit", func(t *testing.T) {
		t.Parallel()
		m := newCaptureMesh(t, func(c *proxy.Config, m *captureMesh) {
			c.Agents = newAgents().add(other, agentX, testca.NewCredentials(m.ca, m.ca.SVID(t, agentX)))
			c.Unattested = proxy.UnattestedDeny
		})
		c := m.dialExplicit(t)
		if _, err := c.Write(append(socksGreeting, socksConnectIP(loopbackPort(m.echo.port))...)); err != nil {
			t.Fatal(err)
		}
		expect(t, c, socksNoAuth)
		expect(t, c, socksReply(0x02)) // connection not allowed by ruleset
		waitFor(t, m.a.audit, "unattested", func(h audit.Handshake) bool { return h.Reason == string(proxy.ReasonUnattested) })
	})
}

// TestAgentWithoutSVID: an attested agent whose credentials have no SVID is
// refused (no_svid); the host's SVID is never presented in its place.
func TestAgentWithoutSVID(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	m := agentMesh(t, newAgents().add(ownUID(), agentX, testca.NewCredentials(ca, nil)), nil)
	from := m.a.audit.len()
	m.refusedRoute(t)
	rec := waitForFrom(t, m.a.audit, from, "no_svid", func(h audit.Handshake) bool { return h.Reason == string(proxy.ReasonNoSVID) })
	if rec.LocalID != agentX.String() {
		t.Errorf("A's record %+v, want local_id %s", rec, agentX)
	}
	if got := m.b.metric(t, "agentmesh_proxy_handshakes_total", nil); got != 0 {
		t.Errorf("B counted %v handshakes, want none", got)
	}
}

// TestPoolKeyedByIdentity: on a pooled transport the host identity and an
// agent's each get a pooled connection of their own, and further streams of
// either ride their own.
func TestPoolKeyedByIdentity(t *testing.T) {
	t.Parallel()
	eachPooled(t, func(t *testing.T, transport string) {
		agents := newAgents()
		m := agentMesh(t, agents, func(c *proxy.Config) {
			c.Transports = []string{transport, proxy.TransportTLS}
			for i := range c.Routes {
				c.Routes[i].Transport = transport
			}
		})
		asHost := m.connect(t, "host")
		agents.add(ownUID(), agentX, testca.NewCredentials(m.ca, m.ca.SVID(t, agentX)))
		asAgent := m.connect(t, "agent")
		again := m.connect(t, "agent again")
		hs := waitCount(t, m.b.audit, 2, "inbound "+transport, func(h audit.Handshake) bool {
			return h.Transport == transport && h.Direction == "inbound"
		})
		peers := map[string]bool{}
		for _, h := range hs {
			peers[h.PeerID] = true
		}
		if len(hs) != 2 || !peers[idA.String()] || !peers[agentX.String()] {
			t.Errorf("B's %s handshakes %+v, want one from %s and one from %s", transport, hs, idA, agentX)
		}
		labels := map[string]string{"direction": "outbound", "transport": transport}
		if got := m.a.metric(t, "agentmesh_proxy_pool_connections", labels); got != 2 {
			t.Errorf("pool_connections%v = %v, want 2", labels, got)
		}
		byLocal := map[spiffeid.ID]int{}
		for _, ci := range m.a.Connections() {
			byLocal[ci.LocalID]++
		}
		if byLocal[idA] != 1 || byLocal[agentX] != 2 {
			t.Errorf("A's streams by local identity %v, want 1 host and 2 agent", byLocal)
		}
		for _, c := range []*net.TCPConn{asHost, asAgent, again} {
			_ = c.Close()
		}
	})
}

// TestUnattestedConfig: Unattested must be one of the policies.
func TestUnattestedConfig(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	_, err := proxy.New(proxy.Config{
		ID: idA, Credentials: testca.NewCredentials(ca, ca.SVID(t, idA)), TunnelListen: "127.0.0.1:0",
		Unattested: proxy.UnattestedPolicy(7),
	})
	if !errors.Is(err, proxy.ErrInvalidConfig) {
		t.Errorf("New with Unattested 7: %v, want ErrInvalidConfig", err)
	}
	for u, want := range map[proxy.UnattestedPolicy]string{proxy.UnattestedHost: "host", proxy.UnattestedDeny: "deny"} {
		if u.String() != want {
			t.Errorf("%d.String() = %q, want %q", int(u), u.String(), want)
		}
	}
}

// addrPort is a's address and port, IPv4 unmapped.
func addrPort(t testing.TB, a net.Addr) netip.AddrPort {
	t.Helper()
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		t.Fatal(err)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
