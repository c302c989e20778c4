package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// lan is a set of network namespaces joined by a bridge in a hub namespace: the test's
// own hosts, on addresses from 198.18.0.0/15 (the range set aside for network tests)
// and, in IPv6, from a unique local prefix (fd00:198:18:N::/64). Everything it creates
// is deleted when the test ends.
type lan struct {
	t     *testing.T
	id    string
	hub   string
	hosts map[string]*lanHost
	next  int
	net   string // 198.18.N
	net6  string // fd00:198:18:N::
}

type lanHost struct {
	host
	ip  string
	ip6 string // the host's IPv6 address on the LAN
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces and iptables")
	}
	for _, tool := range []string{"ip", "iptables", "iptables-save", "curl"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed: run make deps", tool)
		}
	}
}

func newLAN(t *testing.T) *lan {
	t.Helper()
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	l := &lan{t: t, id: hex.EncodeToString(b), hosts: map[string]*lanHost{}, next: 1,
		net: fmt.Sprintf("198.18.%d", int(b[0])%200+10), net6: fmt.Sprintf("fd00:198:18:%d::", int(b[0])%200+10)}
	l.hub = "am-hub-" + l.id
	l.ip("netns", "add", l.hub)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", l.hub).Run() })
	l.ip("-n", l.hub, "link", "add", "br0", "type", "bridge")
	l.ip("-n", l.hub, "link", "set", "br0", "up")
	return l
}

// add creates a host namespace with one interface on the LAN and loopback up.
func (l *lan) add(name string) *lanHost {
	l.t.Helper()
	ns := "am-" + name + "-" + l.id
	h := &lanHost{host: host{ns: ns}, ip: fmt.Sprintf("%s.%d", l.net, l.next), ip6: fmt.Sprintf("%s%d", l.net6, l.next)}
	l.next++
	l.ip("netns", "add", ns)
	l.t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	peer := "v" + name + l.id
	l.ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", peer, "netns", l.hub)
	l.ip("-n", l.hub, "link", "set", peer, "master", "br0", "up")
	l.ip("-n", ns, "addr", "add", h.ip+"/24", "dev", "eth0")
	// nodad: usable at once, not after duplicate address detection.
	l.ip("-n", ns, "addr", "add", h.ip6+"/64", "dev", "eth0", "nodad")
	l.ip("-n", ns, "link", "set", "eth0", "up")
	l.ip("-n", ns, "link", "set", "lo", "up")
	l.hosts[name] = h
	return h
}

func (l *lan) ip(args ...string) {
	l.t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		l.t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// run runs a command in h and returns its combined output.
func (h *lanHost) run(t *testing.T, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), timeout)
	defer cancel()
	cmd := h.command(name, args...)
	cmd = exec.CommandContext(ctx, cmd.Path, cmd.Args[1:]...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// mustRun is run that fails the test on error.
func (h *lanHost) mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := h.run(t, 30*time.Second, name, args...)
	if err != nil {
		t.Fatalf("%s: %s %s: %v\n%s", h.ns, name, strings.Join(args, " "), err, out)
	}
	return out
}

// join puts the test process itself on the LAN, at the .254 address, so that it can
// reach the hosts' listeners directly; it returns that address.
func (l *lan) join() string {
	l.t.Helper()
	self, peer := "amt"+l.id, "vt"+l.id
	l.ip("link", "add", self, "type", "veth", "peer", "name", peer, "netns", l.hub)
	l.t.Cleanup(func() { _ = exec.Command("ip", "link", "del", self).Run() })
	l.ip("-n", l.hub, "link", "set", peer, "master", "br0", "up")
	addr := l.net + ".254"
	l.ip("addr", "add", addr+"/24", "dev", self)
	l.ip("link", "set", self, "up")
	return addr
}
