package proxy_test

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/proxy"
)

// netnsChildEnv, when set, tells TestTransparentLoopback that it runs inside
// its network namespace (its value is the namespace's name).
const netnsChildEnv = "AGENTMESH_TEST_NETNS"

// TestTransparentLoopback shows transparent capture with real iptables: a
// plain client connection to 127.0.0.2:<port> (or [::1]:<port>) is
// REDIRECTed to A's outbound port, A reads the original destination with
// SO_ORIGINAL_DST and tunnels it to B, which delivers it to the target. The
// proxies' own sockets carry Config.Mark and are left alone by a "-m mark
// -j RETURN" rule, though their ports are redirected too. The client's
// socket, which still points at the original destination, is attested: its
// uid is agent x's, whose SVID A presents. A direct
// connection to the outbound port and a redirect to one of A's own
// listeners are refused with their reasons.
//
// It needs root, ip and iptables, and creates its own network namespace,
// deleted at the end. The test body runs in a child process started with
// "ip netns exec": setns(2) moves only the calling thread, and the proxies
// dial from whichever thread their goroutine runs on, so an in-process
// namespace switch would put the listeners in one namespace and the dials
// in another.
func TestTransparentLoopback(t *testing.T) {
	if name := os.Getenv(netnsChildEnv); name != "" {
		transparentInNetns(t, name)
		return
	}
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace and iptables rules")
	}
	for _, tool := range []string{"ip", "iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s: %v", tool, err)
		}
	}
	var b [4]byte
	_, _ = rand.Read(b[:])
	name := "agentmesh-t-" + hex.EncodeToString(b[:])
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Skipf("cannot create a network namespace: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("delete network namespace %s: %v: %s", name, err, out)
		}
	})
	cmd := exec.CommandContext(t.Context(), "ip", "netns", "exec", name, os.Args[0],
		"-test.run=^TestTransparentLoopback$", "-test.count=1", "-test.v", "-test.timeout=2m")
	cmd.Env = append(os.Environ(), netnsChildEnv+"="+name)
	out, err := cmd.CombinedOutput()
	t.Logf("in network namespace %s:\n%s", name, out)
	if err != nil {
		t.Fatalf("test in the network namespace failed: %v", err)
	}
	if !strings.Contains(string(out), "--- PASS: TestTransparentLoopback") {
		t.Fatal("the test in the network namespace did not pass (skipped?)")
	}
}

// transparentInNetns is the test body, in the namespace.
func transparentInNetns(t *testing.T, netns string) {
	run(t, "ip", "link", "set", "lo", "up")
	const mark = 0x2a5e
	ca := testca.New(t)
	tg := startTarget(t, echo) // 127.0.0.1 only: 127.0.0.2 and ::1 reach it only through the mesh
	b := start(t, ca, idB, proxy.Config{
		Services: []proxy.Service{{Port: tg.port, Allow: []spiffeid.ID{agentX}}},
		Mark:     mark, // B's dial to the target is on the captured port
	})
	peerB := proxy.Peer{ID: idB, Tunnel: b.TunnelAddr().String()}
	a := start(t, ca, idA, proxy.Config{
		Outbound: ":0", // dual-stack wildcard, as ":15001" is in production
		Directory: staticDirectory{
			netip.MustParseAddr("127.0.0.2"): peerB,
			netip.MustParseAddr("::1"):       peerB,
		},
		Mark:       mark,
		Agents:     newAgents().add(ownUID(), agentX, testca.NewCredentials(ca, ca.SVID(t, agentX))),
		Unattested: proxy.UnattestedDeny,
	})
	out := strconv.Itoa(int(portOf(t, a.OutboundAddr())))
	redirect := func(tool string, port uint16) {
		run(t, tool, "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", strconv.Itoa(int(port)), "-j", "REDIRECT", "--to-ports", out)
	}
	markRule := []string{"-w", "-t", "nat", "-A", "OUTPUT", "-m", "mark", "--mark", fmt.Sprintf("%#x", mark), "-j", "RETURN"}
	run(t, "iptables", markRule...)
	redirect("iptables", tg.port)                   // the agents' traffic
	redirect("iptables", portOf(t, b.TunnelAddr())) // only the mark keeps A's tunnel dial out of capture
	redirect("iptables", portOf(t, a.TunnelAddr())) // a redirect to A itself: the loop case
	ipv6 := false
	if _, err := exec.LookPath("ip6tables"); err == nil {
		if err := exec.Command("ip6tables", markRule...).Run(); err == nil {
			redirect("ip6tables", tg.port)
			ipv6 = true
		}
	}
	t.Logf("netns %s: mark %#x, A outbound :%s, target port %d, ipv6 %v", netns, mark, out, tg.port, ipv6)

	refused := func(t *testing.T, addr string) {
		t.Helper()
		c, err := net.DialTimeout("tcp", addr, waitLimit)
		if err != nil {
			t.Fatalf("dial %s: %v", addr, err)
		}
		defer func() { _ = c.Close() }()
		_ = c.SetDeadline(time.Now().Add(waitLimit))
		_, _ = c.Write([]byte("must not arrive"))
		if got, _ := io.ReadAll(c); len(got) != 0 {
			t.Fatalf("got %q from a refused connection", got)
		}
	}
	tests := []struct {
		name     string
		skip     bool
		addr     string
		reason   proxy.Reason // "" for tunnelled
		peerAddr string       // of the refusal record; "client" for the client's address
		captured string
	}{
		{name: "redirected_ipv4", addr: fmt.Sprintf("127.0.0.2:%d", tg.port), captured: "ok"},
		{name: "redirected_ipv6", skip: !ipv6, addr: fmt.Sprintf("[::1]:%d", tg.port), captured: "ok"},
		{name: "direct_connection", addr: "127.0.0.1:" + out, reason: proxy.ReasonNoOriginalDst, peerAddr: "client", captured: "refused"},
		{name: "loop", addr: a.TunnelAddr().String(), reason: proxy.ReasonLoop, peerAddr: a.TunnelAddr().String(), captured: "refused"},
		{name: "unknown_destination", addr: fmt.Sprintf("127.0.0.3:%d", tg.port), reason: proxy.ReasonUnknownDestination,
			peerAddr: fmt.Sprintf("127.0.0.3:%d", tg.port), captured: "denied"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.skip {
				t.Skip("no ip6tables nat in this namespace")
			}
			labels := map[string]string{"mode": "transparent", "result": tc.captured}
			before := a.metric(t, "agentmesh_proxy_captured_total", labels)
			from := a.audit.len()
			if tc.reason != "" {
				refused(t, tc.addr)
				rec := waitForFrom(t, a.audit, from, string(tc.reason), func(h audit.Handshake) bool { return h.Reason == string(tc.reason) })
				if tc.peerAddr != "client" && rec.PeerAddr != tc.peerAddr {
					t.Errorf("record %+v, want peer_addr %s", rec, tc.peerAddr)
				}
				if rec.Result != "refused" || rec.Transport != "none" {
					t.Errorf("record %+v, want refused before any dial", rec)
				}
			} else {
				c, err := net.DialTimeout("tcp", tc.addr, waitLimit)
				if err != nil {
					t.Fatalf("dial %s: %v", tc.addr, err)
				}
				_ = c.SetDeadline(time.Now().Add(waitLimit))
				if err := ping(t, c, "redirected to "+tc.addr); err != nil {
					t.Fatal(err)
				}
				_ = c.Close()
				// SO_ORIGINAL_DST was read right: A names the original
				// destination, B delivered to the target's port.
				rec := waitForFrom(t, a.audit, from, "closed", func(audit.Connection) bool { return true })
				if rec.Target != tc.addr || rec.PeerID != idB.String() || rec.LocalID != agentX.String() {
					t.Errorf("A's connection record %+v, want target %s through %s as %s", rec, tc.addr, idB, agentX)
				}
			}
			if after := a.metric(t, "agentmesh_proxy_captured_total", labels); after != before+1 {
				t.Errorf("captured_total%v went %v -> %v, want +1", labels, before, after)
			}
		})
	}
	// The proxies' own dials were never captured: nothing else reached A's
	// outbound port.
	var total float64
	for _, r := range []string{"ok", "passthrough", "denied", "refused", "error"} {
		total += a.metric(t, "agentmesh_proxy_captured_total", map[string]string{"mode": "transparent", "result": r})
	}
	want := 4.0
	if ipv6 {
		want = 5
	}
	if total != want {
		t.Errorf("transparent captures = %v, want %v: the proxies' own traffic was captured", total, want)
	}
}

// run runs a command and fails the test if it fails.
func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}
