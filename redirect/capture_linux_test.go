package redirect

import (
	"net/netip"
	"strings"
	"testing"
)

// setupLink gives ns a loopback and a veth with addr (IPv4 or IPv6 CIDR, several allowed).
// A dummy link would do, but not every kernel has the module; veth is everywhere netns is.
func setupLink(t *testing.T, ns string, addrs ...string) {
	t.Helper()
	nsRun(t, ns, "", "ip", "link", "set", "lo", "up")
	nsRun(t, ns, "", "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
	for _, a := range addrs {
		args := []string{"addr", "add", a, "dev", "v0"}
		if strings.Contains(a, ":") {
			args = []string{"-6", "addr", "add", a, "dev", "v0", "nodad"} // usable at once
		}
		nsRun(t, ns, "", "ip", args...)
	}
	nsRun(t, ns, "", "ip", "link", "set", "v0", "up")
	nsRun(t, ns, "", "ip", "link", "set", "v1", "up")
}

type dialCase struct {
	name string
	addr string
	mark int    // SO_MARK of the client socket, 0 = none
	uid  int    // the client's uid, 0 = root
	want string // the server's answer: "<listener> <original dst>", or a prefix of it
}

func runDials(t *testing.T, ns string, cases []dialCase) {
	t.Helper()
	for _, dc := range cases {
		if got := dialFrom(t, ns, dc.addr, dc.mark, dc.uid); !strings.HasPrefix(got, dc.want) {
			t.Errorf("%s: dial %s (mark %#x, uid %d) answered %q, want %q", dc.name, dc.addr, dc.mark, dc.uid, got, dc.want)
		}
	}
}

// TestCaptureOutbound checks the rules do what they say to real connections: a listener on
// 127.0.0.1:OutboundPort stands in for the proxy, others for the real destinations. It
// installs two configs in turn (the second one over the first) and then removes.
func TestCaptureOutbound(t *testing.T) {
	requireNetns(t, "iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore")
	t.Parallel()
	ns := newNetns(t)
	setupLink(t, ns, "192.0.2.1/24", "192.0.2.200/24", "2001:db8::1/64")
	startServer(t, ns,
		"proxy=127.0.0.1:15001", "proxy6=[::1]:15001",
		"dest=192.0.2.1:8080", "dest6=[2001:db8::1]:8080", "dest-excluded=192.0.2.200:8080",
		"other-port=192.0.2.1:8081", "loopback=127.0.0.1:8080")
	const (
		proxyMark = 0x539
		proxyUID  = 1337
	)

	runDials(t, ns, []dialCase{
		{name: "before Install nothing is captured", addr: "192.0.2.1:8080", want: "dest "},
	})

	phases := []struct {
		name  string
		cfg   Config
		dials []dialCase
	}{
		{
			name: "included ports and CIDRs",
			cfg: Config{
				ExcludeMark:  proxyMark,
				IncludePorts: []uint16{8080},
				IncludeCIDRs: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/25"), netip.MustParsePrefix("2001:db8::/32")},
				IPv6:         true,
			},
			dials: []dialCase{
				{name: "agent traffic is captured, original dst intact", addr: "192.0.2.1:8080", want: "proxy 192.0.2.1:8080"},
				{name: "the proxy's marked traffic is not", addr: "192.0.2.1:8080", mark: proxyMark, want: "dest "},
				{name: "another mark is captured", addr: "192.0.2.1:8080", mark: 0x1, want: "proxy 192.0.2.1:8080"},
				{name: "a port not included is not", addr: "192.0.2.1:8081", want: "other-port "},
				{name: "a destination not included is not", addr: "192.0.2.200:8080", want: "dest-excluded "},
				{name: "IPv6 agent traffic is captured", addr: "[2001:db8::1]:8080", want: "proxy6 [2001:db8::1]:8080"},
				{name: "IPv6 marked traffic is not", addr: "[2001:db8::1]:8080", mark: proxyMark, want: "dest6 "},
			},
		},
		{
			name: "everything but exclusions",
			cfg: Config{
				ExcludeUIDs:  []int{proxyUID},
				ExcludeMark:  proxyMark,
				ExcludePorts: []uint16{8081},
				ExcludeCIDRs: []netip.Prefix{netip.MustParsePrefix("192.0.2.200/32")},
			},
			dials: []dialCase{
				{name: "agent traffic is captured", addr: "192.0.2.1:8080", want: "proxy 192.0.2.1:8080"},
				{name: "the proxy's uid is not", addr: "192.0.2.1:8080", uid: proxyUID, want: "dest "},
				{name: "another uid is captured", addr: "192.0.2.1:8080", uid: proxyUID + 1, want: "proxy 192.0.2.1:8080"},
				{name: "the proxy's mark is not", addr: "192.0.2.1:8080", mark: proxyMark, want: "dest "},
				{name: "an excluded port is not", addr: "192.0.2.1:8081", want: "other-port "},
				{name: "an excluded CIDR is not", addr: "192.0.2.200:8080", want: "dest-excluded "},
				{name: "loopback is never captured", addr: "127.0.0.1:8080", want: "loopback "},
				{name: "IPv6 is no longer captured", addr: "[2001:db8::1]:8080", want: "dest6 "},
			},
		},
	}
	for _, ph := range phases {
		cfg := ph.cfg
		cfg.Command = inNetns(ns)
		if err := Install(t.Context(), cfg); err != nil {
			t.Fatalf("%s: Install: %v", ph.name, err)
		}
		for i := range ph.dials {
			ph.dials[i].name = ph.name + ": " + ph.dials[i].name
		}
		runDials(t, ns, ph.dials)
	}

	if err := Remove(t.Context(), Config{Command: inNetns(ns)}); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	runDials(t, ns, []dialCase{
		{name: "after Remove nothing is captured", addr: "192.0.2.1:8080", want: "dest "},
		{name: "after Remove nothing is captured (IPv6)", addr: "[2001:db8::1]:8080", want: "dest6 "},
	})
}

// TestCaptureStrictInbound: plain TCP from another host to a strict port lands on the
// proxy's InboundPort; other ports reach the agent.
func TestCaptureStrictInbound(t *testing.T) {
	requireNetns(t, "iptables-save", "iptables-restore")
	t.Parallel()
	server, client := newNetns(t), newNetns(t)
	nsRun(t, server, "", "ip", "link", "set", "lo", "up")
	// One veth pair between the two namespaces: server 10.77.0.1, client 10.77.0.2.
	nsRun(t, server, "", "ip", "link", "add", "vs", "type", "veth", "peer", "name", "vc", "netns", client)
	nsRun(t, server, "", "ip", "addr", "add", "10.77.0.1/24", "dev", "vs")
	nsRun(t, server, "", "ip", "link", "set", "vs", "up")
	nsRun(t, client, "", "ip", "addr", "add", "10.77.0.2/24", "dev", "vc")
	nsRun(t, client, "", "ip", "link", "set", "vc", "up")
	startServer(t, server,
		"inbound=0.0.0.0:15006", "proxy=127.0.0.1:15001",
		"agent=10.77.0.1:9000", "agent-open=10.77.0.1:9001")

	cfg := Config{ExcludeMark: 0x539, StrictPorts: []uint16{9000}, Command: inNetns(server)}
	if err := Install(t.Context(), cfg); err != nil {
		t.Fatalf("Install: %v", err)
	}
	runDials(t, client, []dialCase{
		{name: "plain inbound to a strict port goes to the proxy", addr: "10.77.0.1:9000", want: "inbound 10.77.0.1:9000"},
		{name: "other ports reach the agent", addr: "10.77.0.1:9001", want: "agent-open "},
	})
	runDials(t, server, []dialCase{
		// Local traffic never passes PREROUTING; to a non-loopback address it is outbound
		// traffic and the outbound chain captures it.
		{name: "from the host itself it is outbound capture", addr: "10.77.0.1:9000", want: "proxy 10.77.0.1:9000"},
	})
	if err := Remove(t.Context(), cfg); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	runDials(t, client, []dialCase{
		{name: "after Remove the agent is reachable directly", addr: "10.77.0.1:9000", want: "agent "},
	})
}
