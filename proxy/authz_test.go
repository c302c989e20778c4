package proxy_test

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/policy"
	"github.com/agentmesh/agentmesh/proxy"
)

// mustPolicy parses a policy file; format's verbs are filled with args.
func mustPolicy(t testing.TB, format string, args ...any) *policy.Authz {
	t.Helper()
	a, err := policy.ParseAuthz([]byte(fmt.Sprintf(format, args...)))
	if err != nil {
		t.Fatalf("policy: %v", err)
	}
	return a
}

// policyMesh is B in front of n echo targets and A with one route to each
// (A's route i to target i); bcfg and acfg adjust the configs.
type policyMesh struct {
	ca      *testca.CA
	a, b    *node
	targets []*target
}

func newPolicyMesh(t testing.TB, n int, bcfg, acfg func(*proxy.Config, *policyMesh)) *policyMesh {
	t.Helper()
	m := &policyMesh{ca: testca.New(t)}
	for range n {
		m.targets = append(m.targets, startTarget(t, echo))
	}
	var bc proxy.Config
	if bcfg != nil {
		bcfg(&bc, m)
	}
	m.b = start(t, m.ca, idB, bc)
	var ac proxy.Config
	for _, tg := range m.targets {
		ac.Routes = append(ac.Routes, proxy.Route{Listen: "127.0.0.1:0", Peer: m.b.TunnelAddr().String(), PeerID: idB, TargetPort: tg.port})
	}
	if acfg != nil {
		acfg(&ac, m)
	}
	m.a = start(t, m.ca, idA, ac)
	return m
}

// port is target i's port.
func (m *policyMesh) port(i int) uint16 { return m.targets[i].port }

// dial connects to A's route i.
func (m *policyMesh) dial(t testing.TB, i int) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", m.a.RouteAddr(i).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(waitLimit))
	return c.(*net.TCPConn)
}

// open connects through route i and checks that the tunnel carries bytes.
func (m *policyMesh) open(t testing.TB, i int) *net.TCPConn {
	t.Helper()
	c := m.dial(t, i)
	if err := ping(t, c, fmt.Sprintf("route %d", i)); err != nil {
		t.Fatalf("route %d: %v", i, err)
	}
	return c
}

// refused connects through route i and checks that nothing comes back.
func (m *policyMesh) refused(t testing.TB, i int) {
	t.Helper()
	c := m.dial(t, i)
	_, _ = c.Write([]byte("must not arrive"))
	if got, _ := io.ReadAll(c); len(got) != 0 {
		t.Fatalf("route %d: got %q through a refused tunnel", i, got)
	}
}

// closedByPeer checks that c has been closed under the agent, and closes
// it as the agent would once it sees the end.
func closedByPeer(t testing.TB, c *net.TCPConn, what string) {
	t.Helper()
	defer func() { _ = c.Close() }()
	if _, err := c.Write([]byte("after")); err != nil {
		return // already reset
	}
	if got, _ := io.ReadAll(c); len(got) != 0 {
		t.Errorf("%s: still carried %q", what, got)
	}
}

// authzDenied reads agentmesh_proxy_authz_denied_total{direction, rule="default"}.
func (n *node) authzDenied(t testing.TB, dir string) float64 {
	t.Helper()
	return n.metric(t, "agentmesh_proxy_authz_denied_total", map[string]string{"direction": dir, "rule": "default"})
}

// TestPolicyInbound: with a policy and no Services, a peer reaches the ports
// a rule grants it (by port, or by the local agent registered at the port)
// and no other; a refusal is audited as an authorization record naming the
// deciding rule and counted; a peer no rule names is refused at the
// handshake.
func TestPolicyInbound(t *testing.T) {
	t.Parallel()
	m := newPolicyMesh(t, 3, func(c *proxy.Config, m *policyMesh) {
		c.Agents = newAgents().listen(m.port(1), agentY)
		c.Policy = mustPolicy(t, `
inbound:
  - name: a-to-echo
    from: [%s]
    to: {ports: [%d]}
  - name: a-to-agent-y
    from: [%s]
    to: {id: %s}
`, idA, m.port(0), idA, agentY)
	}, nil)

	_ = m.open(t, 0)
	c := m.open(t, 1)
	var toAgent proxy.ConnInfo
	for _, ci := range m.b.Connections() {
		if ci.Port == m.port(1) {
			toAgent = ci
		}
	}
	if toAgent.DstID != agentY || toAgent.LocalID != idB || toAgent.PeerID != idA {
		t.Errorf("B's connection to the agent's port: %+v, want dst %s", toAgent, agentY)
	}
	_ = c.Close()
	rec := waitFor(t, m.b.audit, "connection to the agent", func(r audit.Connection) bool {
		return strings.HasSuffix(r.Target, fmt.Sprintf(":%d", m.port(1)))
	})
	if rec.DstID != agentY.String() || rec.LocalID != idB.String() {
		t.Errorf("B's connection record %+v, want dst_id %s", rec, agentY)
	}

	from := m.b.audit.len()
	m.refused(t, 2)
	az := waitForFrom(t, m.b.audit, from, "denied", func(audit.Authorization) bool { return true })
	want := audit.Authorization{Direction: "inbound", Result: "denied", SrcID: idA.String(), DstID: idB.String(),
		Port: m.port(2), Rule: "default", PeerAddr: az.PeerAddr, Target: fmt.Sprintf("127.0.0.1:%d", m.port(2)), Policy: 1}
	if az != want || az.PeerAddr == "" {
		t.Errorf("B's authorization record %+v, want %+v", az, want)
	}
	h := waitForFrom(t, m.b.audit, from, "refused", func(h audit.Handshake) bool { return h.Result != "ok" })
	if h.Reason != string(proxy.ReasonPolicyDenied) {
		t.Errorf("B's handshake record %+v, want %s", h, proxy.ReasonPolicyDenied)
	}
	if got := m.b.authzDenied(t, "inbound"); got != 1 {
		t.Errorf("authz_denied{inbound} = %v, want 1", got)
	}

	// C is in no rule: refused before it can name a port.
	tc := start(t, m.ca, idC, proxy.Config{Routes: []proxy.Route{{Listen: "127.0.0.1:0",
		Peer: m.b.TunnelAddr().String(), PeerID: idB, TargetPort: m.port(0)}}})
	from = m.b.audit.len()
	cc, err := net.Dial("tcp", tc.RouteAddr(0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cc.Close() }()
	_ = cc.SetDeadline(time.Now().Add(waitLimit))
	_, _ = cc.Write([]byte("x"))
	_, _ = io.ReadAll(cc)
	if h := nextHandshake(t, m.b, from); h.PeerID != idC.String() || h.Reason != string(proxy.ReasonPeerNotAllowed) {
		t.Errorf("B's record for C %+v, want %s", h, proxy.ReasonPeerNotAllowed)
	}
}

// TestPolicyOutbound: with outbound rules, a captured connection goes out
// only if a rule lets its identity call the destination, which is the
// remote agent registered at the target port when there is one, else the
// peer proxy; a refusal happens before any dial, is audited and counted,
// and the client is told. A policy without outbound rules restricts
// nothing.
func TestPolicyOutbound(t *testing.T) {
	t.Parallel()
	m := newCaptureMesh(t, func(c *proxy.Config, m *captureMesh) {
		c.Directory = staticDirectory{netip.MustParseAddr("127.0.0.1"): {ID: idB, Tunnel: m.b.TunnelAddr().String(),
			Agents: map[uint16]spiffeid.ID{m.echo.port: agentY}}}
		c.Policy = mustPolicy(t, `
outbound:
  - name: a-to-y
    from: [%s]
    to: [%s]
`, idA, agentY)
	})
	socks := func(t *testing.T, port uint16, reply []byte) *net.TCPConn {
		t.Helper()
		c := m.dialExplicit(t)
		if _, err := c.Write(append(socksGreeting, socksConnectIP(loopbackPort(port))...)); err != nil {
			t.Fatal(err)
		}
		expect(t, c, socksNoAuth)
		expect(t, c, reply)
		return c
	}

	c := socks(t, m.echo.port, socksSucceeded)
	if err := ping(t, c, "to agent y"); err != nil {
		t.Fatal(err)
	}
	if conns := m.a.Connections(); len(conns) != 1 || conns[0].DstID != agentY || conns[0].LocalID != idA {
		t.Errorf("A's connections %+v, want one from %s to %s", conns, idA, agentY)
	}
	_ = c.Close()

	handshakes := m.b.metric(t, "agentmesh_proxy_handshakes_total", nil)
	from := m.a.audit.len()
	_ = socks(t, m.webPort, socksReply(0x02)) // connection not allowed by ruleset
	az := waitForFrom(t, m.a.audit, from, "denied", func(audit.Authorization) bool { return true })
	target := fmt.Sprintf("127.0.0.1:%d", m.webPort)
	want := audit.Authorization{Direction: "outbound", Result: "denied", SrcID: idA.String(), DstID: idB.String(),
		Port: m.webPort, Rule: "default", PeerAddr: m.b.TunnelAddr().String(), Target: target, Policy: 1}
	if az != want {
		t.Errorf("A's authorization record %+v, want %+v", az, want)
	}
	h := waitForFrom(t, m.a.audit, from, "refused", func(h audit.Handshake) bool { return h.Result != "ok" })
	if h.Reason != string(proxy.ReasonPolicyDenied) || h.Transport != "none" {
		t.Errorf("A's handshake record %+v, want %s before any dial", h, proxy.ReasonPolicyDenied)
	}
	if got := m.a.authzDenied(t, "outbound"); got != 1 {
		t.Errorf("authz_denied{outbound} = %v, want 1", got)
	}
	if got := m.b.metric(t, "agentmesh_proxy_handshakes_total", nil); got != handshakes {
		t.Errorf("B counted %v handshakes, want %v: a denied call was dialed", got, handshakes)
	}

	if v, closed := m.a.SetPolicy(mustPolicy(t, "inbound:\n  - name: any\n    from: [%s]\n    to: {ports: [1]}\n", idB)); v != 2 || closed != 0 {
		t.Errorf("SetPolicy = %d, %d, want version 2, 0 closed", v, closed)
	}
	_ = socks(t, m.webPort, socksSucceeded).Close()
}

// TestSetPolicyCloses: SetPolicy closes exactly the live connections the
// new policy no longer allows, inbound on the peer's side and outbound on
// the caller's, tls connections and streams of pooled ones alike; each gets
// an authorization record (result closed) and a connection record with
// reason policy_revoked. The others carry on, and new connections follow
// the new policy.
func TestSetPolicyCloses(t *testing.T) {
	t.Parallel()
	for _, transport := range []string{proxy.TransportTLS, proxy.TransportH2, proxy.TransportQUIC} {
		t.Run(transport, func(t *testing.T) {
			t.Parallel()
			both := func(c *proxy.Config) {
				c.Transports = []string{transport}
				c.StreamAudit = true
			}
			inbound := `
inbound:
  - name: echo-0
    from: [%s]
    to: {ports: [%d]}
`
			m := newPolicyMesh(t, 2, func(c *proxy.Config, m *policyMesh) {
				both(c)
				c.Policy = mustPolicy(t, inbound+"  - name: echo-1\n    from: [%s]\n    to: {ports: [%d]}\n",
					idA, m.port(0), idA, m.port(1))
			}, func(c *proxy.Config, m *policyMesh) {
				both(c)
				for i := range c.Routes {
					c.Routes[i].Transport = transport
				}
			})
			c0, c1 := m.open(t, 0), m.open(t, 1)

			from := m.b.audit.len()
			version, closed := m.b.SetPolicy(mustPolicy(t, inbound, idA, m.port(0)))
			if version != 2 || closed != 1 {
				t.Fatalf("B.SetPolicy = version %d, %d closed; want 2, 1", version, closed)
			}
			closedByPeer(t, c1, "the connection to port 1")
			az := waitForFrom(t, m.b.audit, from, "closed", func(audit.Authorization) bool { return true })
			want := audit.Authorization{Direction: "inbound", Result: "closed", SrcID: idA.String(), DstID: idB.String(),
				Port: m.port(1), Rule: "default", PeerAddr: az.PeerAddr, Target: fmt.Sprintf("127.0.0.1:%d", m.port(1)), Policy: 2}
			if az != want {
				t.Errorf("B's authorization record %+v, want %+v", az, want)
			}
			rec := waitForFrom(t, m.b.audit, from, "policy_revoked", func(r audit.Connection) bool { return r.Reason == "policy_revoked" })
			if rec.Target != want.Target {
				t.Errorf("B's connection record %+v, want target %s", rec, want.Target)
			}
			if err := ping(t, c0, "still allowed"); err != nil {
				t.Errorf("the connection to port 0: %v", err)
			}
			m.refused(t, 1)
			// A's side of the closed connection is gone too (its record
			// is written once it is unregistered).
			waitFor(t, m.a.audit, "A's record of port 1", func(r audit.Connection) bool {
				return r.Target == want.Target
			})

			// Outbound: A may call nobody but C from now on.
			from = m.a.audit.len()
			version, closed = m.a.SetPolicy(mustPolicy(t, "outbound:\n  - name: only-c\n    from: [%s]\n    to: [%s]\n", idA, idC))
			if version != 2 || closed != 1 {
				t.Fatalf("A.SetPolicy = version %d, %d closed; want 2, 1", version, closed)
			}
			closedByPeer(t, c0, "the connection to port 0")
			az = waitForFrom(t, m.a.audit, from, "closed", func(audit.Authorization) bool { return true })
			if az.Direction != "outbound" || az.Result != "closed" || az.SrcID != idA.String() || az.DstID != idB.String() ||
				az.Port != m.port(0) || az.Rule != "default" || az.Policy != 2 {
				t.Errorf("A's authorization record %+v", az)
			}
			waitForFrom(t, m.a.audit, from, "policy_revoked", func(r audit.Connection) bool { return r.Reason == "policy_revoked" })
		})
	}
}

// TestSetPolicyResumedSession: a peer the new policy no longer admits is
// refused in VerifyConnection even when it resumes a session established
// under the old one (the ticket keys are not replaced).
func TestSetPolicyResumedSession(t *testing.T) {
	t.Parallel()
	port := func(m *policyMesh) uint16 { return m.port(0) }
	m := newPolicyMesh(t, 1, func(c *proxy.Config, m *policyMesh) {
		c.Policy = mustPolicy(t, "inbound:\n  - name: a\n    from: [%s]\n    to: {ports: [%d]}\n", idA, port(m))
	}, nil)
	_ = m.open(t, 0).Close()
	from := m.b.audit.len()
	_ = m.open(t, 0).Close()
	if h := nextHandshake(t, m.b, from); !h.Resumed {
		t.Fatalf("second tunnel did not resume: %+v", h)
	}
	waitCount(t, m.b.audit, 2, "connection", func(audit.Connection) bool { return true })
	if _, closed := m.b.SetPolicy(mustPolicy(t, "inbound:\n  - name: c\n    from: [%s]\n    to: {ports: [%d]}\n", idC, port(m))); closed != 0 {
		t.Errorf("closed %d connections, want none open", closed)
	}
	from = m.b.audit.len()
	m.refused(t, 0)
	if h := nextHandshake(t, m.b, from); h.Reason != string(proxy.ReasonPeerNotAllowed) || !h.Resumed || h.PeerID != idA.String() {
		t.Errorf("B's record %+v, want a resumed session refused with %s", h, proxy.ReasonPeerNotAllowed)
	}
}
