package e2e

import (
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestIPv6Capture: with the default configuration (redirect install without --ipv6, the
// proxy's outbound listener on 127.0.0.1 as in deploy/examples), an agent's IPv6
// connection is captured: ip6tables holds the rules, the connection goes through the
// tunnel under the agent's identity, and both proxies audit it.
func TestIPv6Capture(t *testing.T) {
	requireE2E(t)
	requireRoot(t)
	for _, tool := range []string{"ip6tables-save", "ip6tables-restore", "setpriv"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed: run make deps", tool)
		}
	}
	l := newLAN(t)
	a, b := l.add("a"), l.add("b")
	hostA, hostB := "spiffe://"+trustDomain+"/host/a", "spiffe://"+trustDomain+"/host/b"
	agent := "spiffe://" + trustDomain + "/agent/v6"
	const agentUID = "1001"

	authority := startCAOn(t, a.host, a.ip+":9443", time.Minute)
	if out, errOut, err := runCmdOut(t, binary, "register", agent, "--host", hostA, "--uid", agentUID,
		"--state", authority.state); err != nil {
		t.Fatalf("register: %v\n%s%s", err, out, errOut)
	}
	// Each host claims its IPv4 and IPv6 address: only the one a host connects from is
	// learnt by itself (docs/directory.md, Address claims).
	for _, h := range []struct {
		id string
		lh *lanHost
	}{{hostA, a}, {hostB, b}} {
		if out, errOut, err := runCmdOut(t, binary, "register", h.id, "--addr", h.lh.ip, "--addr", h.lh.ip6,
			"--state", authority.state); err != nil {
			t.Fatalf("register %s --addr: %v\n%s%s", h.id, err, out, errOut)
		}
	}
	svc := startCmd(t, "service-b", b.command(demoService, "-listen", "[::]:8080", "-name", "service-b"))
	awaitListen(t, svc, 8080)
	meshed := func(h *lanHost) string {
		return fmt.Sprintf("mark: 1337\ndirectory:\n  advertise: [%s, %s]\n  heartbeat: 1s\n", h.ip, h.ip6)
	}
	// ":15008": every address, IPv4 and IPv6.
	pb := startProxyOn(t, b.host, authority, "b", ":15008", "127.0.0.1:15020", nil,
		[]service{{port: 8080, allow: []string{agent}}}, meshed(b))
	// unattested: deny is the default; written out only because the harness otherwise
	// lets its own unregistered clients through.
	pa := startProxyOn(t, a.host, authority, "a", "0.0.0.0:15008", "127.0.0.1:15020", nil, nil,
		"outbound: 127.0.0.1:15001\nunattested: deny\n"+meshed(a))
	awaitRecord(t, pa, map[string]string{"type": "rotation", "spiffe_id": agent, "result": "ok"}, 60*time.Second)

	a.mustRun(t, binary, "redirect", "install", "--exclude-mark", "1337")
	if rules := a.mustRun(t, "ip6tables-save", "-t", "nat"); !strings.Contains(rules, "-A OUTPUT -p tcp -j AGENTMESH_OUTPUT") {
		t.Fatalf("redirect install left IPv6 uncaptured:\n%s", rules)
	}

	// The first request may come before proxy A's directory knows B: retried, bounded.
	url := "http://[" + b.ip6 + "]:8080/"
	waitFor(t, 30*time.Second, "curl over IPv6 as the agent", func() error {
		out, err := a.run(t, 20*time.Second, "setpriv", "--reuid="+agentUID, "--regid="+agentUID, "--clear-groups",
			"curl", "-6", "-sS", "--max-time", "10", url)
		if err != nil || !strings.Contains(out, "hello from service-b") {
			return errors.Join(err, fmt.Errorf("output %q", out))
		}
		return nil
	})
	target := "[" + b.ip6 + "]:8080"
	awaitRecord(t, pa, map[string]string{"type": "handshake", "direction": "outbound", "result": "ok",
		"local_id": agent, "peer_id": hostB}, 20*time.Second)
	awaitRecord(t, pa, map[string]string{"type": "connection", "direction": "outbound", "local_id": agent, "target": target}, 20*time.Second)
	awaitRecord(t, pb, map[string]string{"type": "handshake", "direction": "inbound", "result": "ok", "peer_id": agent}, 20*time.Second)

	a.mustRun(t, binary, "redirect", "remove")
	if rules := a.mustRun(t, "ip6tables-save", "-t", "nat"); strings.Contains(rules, "AGENTMESH") {
		t.Errorf("redirect remove left IPv6 rules:\n%s", rules)
	}
}

// TestPassthroughPolicy: destinations outside the mesh (unknown: passthrough) obey the
// outbound policy: host A may pass through to host C but not to host D, whether its
// agents are captured transparently or use the explicit proxy, and the refusal is
// audited. The explicit listener, bound to every address, relays nothing for a client
// on another host.
func TestPassthroughPolicy(t *testing.T) {
	requireE2E(t)
	requireRoot(t)
	l := newLAN(t)
	a, c, d := l.add("a"), l.add("c"), l.add("d")
	hostA := "spiffe://" + trustDomain + "/host/a"

	authority := startCAOn(t, a.host, a.ip+":9443", time.Minute)
	for _, h := range []*lanHost{c, d} {
		name := "service-" + strings.TrimSuffix(strings.TrimPrefix(h.ns, "am-"), "-"+l.id)
		svc := startCmd(t, name, h.command(demoService, "-listen", "0.0.0.0:8080", "-name", name))
		awaitListen(t, svc, 8080)
	}
	policyA := filepath.Join(t.TempDir(), "policy-a.yaml")
	writeFile(t, policyA, fmt.Sprintf(`outbound:
  - name: a-to-c
    from: [%s]
    to: [passthrough:%s, passthrough:%s]
`, hostA, c.ip, c.ip6))
	if out, errOut, err := runCmdOut(t, binary, "policy", "check", policyA); err != nil {
		t.Fatalf("policy check: %v\n%s%s", err, out, errOut)
	}
	pa := startProxyOn(t, a.host, authority, "a", "0.0.0.0:15008", "127.0.0.1:15020", nil, nil,
		"outbound: 127.0.0.1:15001\nexplicit: 0.0.0.0:15080\nunknown: passthrough\nmark: 1337\npolicy: "+policyA+"\n")
	a.mustRun(t, binary, "redirect", "install", "--exclude-mark", "1337")

	curl := func(h *lanHost, args ...string) (string, error) {
		return h.run(t, 20*time.Second, "curl", append([]string{"-sS", "--max-time", "10"}, args...)...)
	}
	toC, toD := "http://"+c.ip+":8080/", "http://"+d.ip+":8080/"
	if out, err := curl(a, toC); err != nil || !strings.Contains(out, "hello from service-c") {
		t.Fatalf("transparent passthrough to c: %v\n%s", err, out)
	}
	if out, err := curl(a, "--proxy", "http://127.0.0.1:15080", toC); err != nil || !strings.Contains(out, "hello from service-c") {
		t.Fatalf("explicit passthrough to c: %v\n%s", err, out)
	}
	if out, err := curl(a, toD); err == nil {
		t.Fatalf("transparent passthrough to d, which the policy does not allow: %q", out)
	}
	if out, err := curl(a, "-o", "/dev/null", "-w", "%{http_code}", "--proxy", "http://127.0.0.1:15080", toD); out != "403" {
		t.Fatalf("explicit passthrough to d: status %q (%v), want 403", out, err)
	}
	// Host D uses A's explicit listener as a relay to C, which A's own agents may reach.
	if out, err := curl(d, "--proxy", "http://"+a.ip+":15080", toC); err == nil {
		t.Fatalf("a client on another host was relayed: %q", out)
	}

	awaitRecord(t, pa, map[string]string{"type": "handshake", "direction": "outbound", "result": "ok",
		"reason": "passthrough", "transport": "tcp", "peer_addr": c.ip + ":8080"}, 20*time.Second)
	awaitRecord(t, pa, map[string]string{"type": "authorization", "direction": "outbound", "result": "denied",
		"src_id": hostA, "target": d.ip + ":8080", "rule": "default"}, 20*time.Second)
	awaitRecord(t, pa, map[string]string{"type": "handshake", "direction": "outbound", "result": "refused",
		"reason": "policy_denied", "peer_addr": d.ip + ":8080"}, 20*time.Second)
	rec := awaitRecord(t, pa, map[string]string{"type": "handshake", "direction": "outbound", "result": "refused",
		"reason": "not_local"}, 20*time.Second)
	if addr := fmt.Sprint(rec["peer_addr"]); !strings.HasPrefix(addr, d.ip+":") {
		t.Errorf("not_local record names %s, want host d's address %s", addr, d.ip)
	}
	a.mustRun(t, binary, "redirect", "remove")
}
