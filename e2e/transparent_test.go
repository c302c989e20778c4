package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestTransparent puts two hosts on the mesh transparently, in network namespaces: on
// host A an unmodified curl reaches an HTTP server on host B by B's plain address and
// port, and the bytes cross the wire only as mutual TLS. Host C, which has no proxy,
// cannot reach B's meshed port (strict mode). The explicit port serves an unprivileged
// curl through its proxy settings. Removing the redirect leaves no rule behind.
func TestTransparent(t *testing.T) {
	requireE2E(t)
	requireRoot(t)
	if _, err := os.Stat("/usr/bin/tcpdump"); err != nil {
		t.Skip("tcpdump not installed: run make deps")
	}
	l := newLAN(t)
	a, b, c := l.add("a"), l.add("b"), l.add("c")
	idA, idB := "spiffe://"+trustDomain+"/host/a", "spiffe://"+trustDomain+"/host/b"

	ca := startCAOn(t, a.host, a.ip+":9443", time.Minute)
	svc := startCmd(t, "service-b", b.command(demoService, "-listen", "0.0.0.0:8080", "-name", "service-b"))
	awaitListen(t, svc, 8080)

	meshed := func(ip string) string {
		return fmt.Sprintf("mark: 1337\ndirectory:\n  advertise: [%s]\n  heartbeat: 1s\n", ip)
	}
	pb := startProxyOn(t, b.host, ca, "b", "0.0.0.0:15008", "127.0.0.1:15020", nil,
		[]service{{port: 8080, allow: []string{idA}}}, "strict: 0.0.0.0:15006\n"+meshed(b.ip))
	pa := startProxyOn(t, a.host, ca, "a", "0.0.0.0:15008", "127.0.0.1:15020", nil, nil,
		"outbound: 127.0.0.1:15001\nexplicit: 127.0.0.1:15080\nunknown: deny\n"+meshed(a.ip))

	// A rule of someone else's, which install and remove must leave alone.
	for _, h := range []*lanHost{a, b} {
		h.mustRun(t, "iptables", "-t", "nat", "-A", "POSTROUTING", "-p", "udp", "--dport", "9", "-j", "RETURN")
	}
	before := map[*lanHost]string{a: iptablesSave(t, a), b: iptablesSave(t, b)}
	direct := curlLatency(t, a, "http://"+b.ip+":8080/", 100)
	// Capture every TCP port: the proxies' own tunnels, renewals and directory
	// heartbeats stay out only because they carry the mark.
	rotationFailures := func() float64 {
		return adminMetricIn(t, a, "agentmesh_rotator_rotations_total", `result="error"`) +
			adminMetricIn(t, b, "agentmesh_rotator_rotations_total", `result="error"`)
	}
	failuresBefore := rotationFailures()
	installed := time.Now()
	a.mustRun(t, binary, "redirect", "install", "--exclude-mark", "1337")
	b.mustRun(t, binary, "redirect", "install", "--exclude-mark", "1337", "--strict-port", "8080")

	pcap := filepath.Join(t.TempDir(), "b.pcap")
	dump := startCmd(t, "tcpdump", b.command("tcpdump", "-i", "eth0", "-n", "-U", "--immediate-mode", "-s", "0", "-w", pcap, "tcp"))
	awaitCapture(t, dump)

	marker := "agentmesh-marker-" + l.id
	url := "http://" + b.ip + ":8080/" + marker
	// A refuses captured connections to an address its directory does not hold yet
	// (unknown: deny), so the first request to pass shows that a knows b.
	waitFor(t, 30*time.Second, "a transparent curl through the mesh", func() error {
		out, err := a.run(t, 20*time.Second, "curl", "-sS", "--max-time", "10", "-H", "X-Marker: "+marker, url)
		if err != nil || !strings.Contains(out, "hello from service-b") {
			return errors.Join(err, fmt.Errorf("answered %q", out))
		}
		return nil
	})

	mesh := curlLatency(t, a, "http://"+b.ip+":8080/", 100)
	fmt.Printf("curl_p50_direct_ms=%.2f curl_p50_mesh_ms=%.2f added_p50_ms=%.2f (100 requests each, new connection per request)\n",
		direct*1000, mesh*1000, (mesh-direct)*1000)

	// Explicit capture for an unprivileged agent, through its proxy settings only.
	nobody := []string{"--reuid=65534", "--regid=65534", "--clear-groups", "env"}
	for _, proxyEnv := range [][]string{
		{"ALL_PROXY=socks5h://127.0.0.1:15080", "curl"},
		{"http_proxy=http://127.0.0.1:15080", "curl"},
		{"HTTPS_PROXY=http://127.0.0.1:15080", "curl", "--proxytunnel", "--proxy", "http://127.0.0.1:15080"},
	} {
		args := append(append(append([]string{}, nobody...), proxyEnv...), "-sS", "--max-time", "10", url)
		if out := a.mustRun(t, "setpriv", args...); !strings.Contains(out, "hello from service-b") {
			t.Fatalf("curl via %s answered %q", proxyEnv[0], out)
		}
	}

	// Strict mode: a host without a proxy cannot reach the meshed port.
	if out, err := c.run(t, 20*time.Second, "curl", "-sS", "--max-time", "5", "http://"+b.ip+":8080/"); err == nil {
		t.Fatalf("host c reached the meshed port in clear: %q", out)
	}

	// Heartbeats every second reach the CA through the rules, renewals do not fail, and
	// the revocation feed stays up.
	ca.awaitHeartbeats(t, installed, idA, idB)
	if n := rotationFailures() - failuresBefore; n != 0 {
		t.Errorf("%v failed rotations once capture was on", n)
	}
	for _, h := range []*lanHost{a, b} {
		if up := metric(t, h, "agentmesh_revocation_feed_up"); up != 1 {
			t.Errorf("%s: revocation feed up = %v once capture was on", h.ns, up)
		}
	}

	if err := dump.stop(); err != nil {
		t.Logf("tcpdump: %v", err)
	}
	wire, err := os.ReadFile(pcap)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(wire, []byte(marker)) {
		t.Fatal("the marker crossed the wire in clear")
	}
	// The ALPN name travels in clear in the ClientHello: the capture saw the tunnel.
	if !bytes.Contains(wire, []byte("agentmesh-tunnel/1")) {
		t.Fatal("the capture did not see the mTLS tunnel: it proves nothing")
	}

	for _, p := range []*meshProxy{pa, pb} {
		if err := p.stop(); err != nil {
			t.Errorf("%s exited with %v", p.name, err)
		}
	}
	wantRecord(t, pa, map[string]string{"type": "handshake", "direction": "outbound", "result": "ok", "peer_id": idB})
	wantRecord(t, pb, map[string]string{"type": "handshake", "direction": "inbound", "result": "ok", "peer_id": idA})
	wantRecord(t, pb, map[string]string{"type": "handshake", "direction": "inbound", "result": "refused", "reason": "plaintext_refused"})

	for _, h := range []*lanHost{a, b} {
		h.mustRun(t, binary, "redirect", "remove")
		h.mustRun(t, binary, "redirect", "remove") // idempotent
		if after := iptablesSave(t, h); after != before[h] {
			t.Errorf("%s: iptables-save after remove differs:\n%s\nbefore:\n%s", h.ns, after, before[h])
		}
	}
}

// curlLatency returns the median total time, in seconds, of n curl requests from h.
func curlLatency(t *testing.T, h *lanHost, url string, n int) float64 {
	t.Helper()
	script := fmt.Sprintf(`for i in $(seq %d); do curl -s -o /dev/null --max-time 10 -w '%%{time_total}\n' %s || exit 1; done`, n, url)
	out := h.mustRun(t, "bash", "-c", script)
	var times []float64
	for _, f := range strings.Fields(out) {
		v, err := strconv.ParseFloat(f, 64)
		if err != nil {
			t.Fatalf("curl -w output %q: %v", f, err)
		}
		times = append(times, v)
	}
	if len(times) != n {
		t.Fatalf("%d timings for %d requests", len(times), n)
	}
	slices.Sort(times)
	return times[n/2]
}

// awaitHeartbeats waits until the CA has heard from every id after since, each
// reporting the version of the trust bundle it holds.
func (c *meshCA) awaitHeartbeats(t *testing.T, since time.Time, ids ...string) {
	t.Helper()
	waitFor(t, 30*time.Second, fmt.Sprintf("the CA hearing from %v since %v", ids, since), func() error {
		out, _, err := runCmdOut(t, "curl", "-sS", "--unix-socket", filepath.Join(c.state, "admin.sock"), "http://ca/directory")
		if err != nil {
			return err
		}
		var doc struct {
			Peers []struct {
				ID     string    `json:"spiffe_id"`
				Last   time.Time `json:"last_heartbeat"`
				Bundle string    `json:"bundle_version"`
			} `json:"peers"`
		}
		if err := json.Unmarshal([]byte(out), &doc); err != nil {
			return err
		}
		fresh := 0
		for _, p := range doc.Peers {
			if slices.Contains(ids, p.ID) && p.Last.After(since) && p.Bundle != "" {
				fresh++
			}
		}
		if fresh != len(ids) {
			return fmt.Errorf("%d of %d fresh: %s", fresh, len(ids), out)
		}
		return nil
	})
}

var saveNoise = regexp.MustCompile(`(?m)^#.*\n|\[\d+:\d+\]`)

// iptablesSave returns iptables-save of h without comments and counters.
func iptablesSave(t *testing.T, h *lanHost) string {
	t.Helper()
	return saveNoise.ReplaceAllString(h.mustRun(t, "iptables-save"), "")
}

// wantRecord fails unless p's audit log holds a record with all the given fields.
func wantRecord(t *testing.T, p *meshProxy, want map[string]string) {
	t.Helper()
	for _, r := range readAudit(t, p.auditPath()) {
		if matches(r, want) {
			return
		}
	}
	t.Errorf("%s: no audit record with %v", p.name, want)
}
