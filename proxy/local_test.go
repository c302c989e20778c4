package proxy_test

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/policy"
	"github.com/agentmesh/agentmesh/proxy"
)

// TestPassthroughOutboundPolicy: a passthrough destination is an outbound call like any
// other: the policy's passthrough: destinations decide it before anything is dialed
// (denied: 403, an authorization record, the connection refused with policy_denied),
// and a policy that no longer allows a live passthrough connection closes it.
func TestPassthroughOutboundPolicy(t *testing.T) {
	t.Parallel()
	allowed := startTargetAt(t, "127.0.0.2:0", echo)
	other := startTargetAt(t, "127.0.0.3:0", echo)
	allowedDst := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), allowed.port)
	otherDst := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.3"), other.port)
	parse := func(doc string) *policy.Authz {
		a, err := policy.ParseAuthz([]byte(doc))
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	pol := parse(fmt.Sprintf("outbound:\n  - name: to-two\n    from: [%s]\n    to: [passthrough:127.0.0.2]\n", idA))
	m := newCaptureMesh(t, func(c *proxy.Config, _ *captureMesh) {
		c.Unknown = proxy.UnknownPassthrough
		c.Policy = pol
	})
	connect := func(dst netip.AddrPort) (net.Conn, string) {
		c := m.dialExplicit(t)
		_, _ = fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\n\r\n", dst)
		buf := make([]byte, len("HTTP/1.1 200"))
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatalf("CONNECT %s: %v", dst, err)
		}
		return c, string(buf)
	}

	from := m.a.audit.len()
	c, status := connect(otherDst)
	_ = c.Close()
	if status != "HTTP/1.1 403" {
		t.Fatalf("CONNECT to a destination the policy does not allow: %q, want 403", status)
	}
	az := waitForFrom(t, m.a.audit, from, "denied", func(audit.Authorization) bool { return true })
	if az.Direction != "outbound" || az.Result != "denied" || az.SrcID != idA.String() || az.Target != otherDst.String() || az.Rule != "default" {
		t.Errorf("authorization record %+v", az)
	}
	h := waitForFrom(t, m.a.audit, from, "refused", func(h audit.Handshake) bool { return true })
	if h.Result != "refused" || h.Reason != string(proxy.ReasonPolicyDenied) || h.Transport != "tcp" {
		t.Errorf("handshake record %+v", h)
	}

	c, status = connect(allowedDst)
	if status != "HTTP/1.1 200" {
		t.Fatalf("CONNECT to an allowed destination: %q", status)
	}
	expect(t, c, []byte(" Connection Established\r\n\r\n"))
	if err := ping(t, c, "allowed passthrough"); err != nil {
		t.Fatal(err)
	}
	// The rule goes: the live passthrough connection is closed.
	from = m.a.audit.len()
	if _, closed := m.a.SetPolicy(parse(fmt.Sprintf("outbound:\n  - name: mesh-only\n    from: [%s]\n    to: [%s]\n", idA, idB))); closed != 1 {
		t.Errorf("SetPolicy closed %d connections, want the passthrough one", closed)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadAll(c); err != nil {
		t.Errorf("the closed passthrough connection: %v", err)
	}
	az = waitForFrom(t, m.a.audit, from, "closed", func(audit.Authorization) bool { return true })
	if az.Result != "closed" || az.Target != allowedDst.String() {
		t.Errorf("authorization record %+v", az)
	}
}

// TestListenerDefaults: an explicit or route listener configured without a host binds
// loopback, and a transparent listener on 127.0.0.1 also receives on [::1] at the same
// port, where ip6tables REDIRECTs (here: a direct connection, refused as not
// redirected).
func TestListenerDefaults(t *testing.T) {
	t.Parallel()
	m := newCaptureMesh(t, func(c *proxy.Config, _ *captureMesh) {
		c.Explicit = ":0"
		c.Outbound = "127.0.0.1:0"
		c.Routes = []proxy.Route{{Listen: ":0", Peer: "127.0.0.1:1", PeerID: idB, TargetPort: 1}}
	})
	for what, a := range map[string]net.Addr{"explicit": m.a.ExplicitAddr(), "route": m.a.RouteAddr(0), "outbound": m.a.OutboundAddr()} {
		if ap := netip.MustParseAddrPort(a.String()); !ap.Addr().IsLoopback() || !ap.Addr().Is4() {
			t.Errorf("%s listener on %s, want 127.0.0.1", what, a)
		}
	}
	if _, err := net.Listen("tcp", "[::1]:0"); err != nil {
		t.Skipf("no IPv6 loopback here: %v", err)
	}
	port := netip.MustParseAddrPort(m.a.OutboundAddr().String()).Port()
	from := m.a.audit.len()
	c, err := net.Dial("tcp", netip.AddrPortFrom(netip.IPv6Loopback(), port).String())
	if err != nil {
		t.Fatalf("the outbound listener does not receive on [::1]: %v", err)
	}
	defer c.Close()
	h := waitForFrom(t, m.a.audit, from, "no_original_dst", func(h audit.Handshake) bool { return true })
	if h.Reason != string(proxy.ReasonNoOriginalDst) {
		t.Errorf("record %+v, want reason %s", h, proxy.ReasonNoOriginalDst)
	}
}
