package e2e

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// Flood sizes: the reproduction, scaled to what a shared test machine takes.
const (
	floodIdle     = 2000            // silent TCP connections held open during the flood
	floodDuration = 5 * time.Second // how long garbage handshakes and QUIC junk are sent
	// floodRecordsMax bounds the audit records the flood may cost: refusals are aggregated
	// per source and interval (10 s by default), and the flood comes from one source.
	floodRecordsMax = 20
)

// TestConnectFlood: 2,000 silent TCP connections, a stream of garbage TLS handshakes and
// of QUIC junk against one proxy while legitimate requests flow through it. No legitimate
// request fails and the flood costs a bounded number of audit records. It prints the
// records, the proxy's RSS before, during and after, and the legitimate p99 during the
// flood.
func TestConnectFlood(t *testing.T) {
	requireE2E(t)
	b, routeAddr := startOKPair(t, "transports: [tls, quic]\n")

	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	if err := get(t.Context(), hc, "http://"+routeAddr+"/"); err != nil {
		t.Fatalf("request before the flood: %v", err)
	}
	pid := b.cmd.Process.Pid
	rssBefore, fdsBefore := rss(t, pid), fds(t, pid)

	// Legitimate requests, one new tunnel each, until the flood is over.
	legitCtx, stopLegit := context.WithCancel(t.Context())
	var (
		legitMu   sync.Mutex
		latencies []time.Duration
		failures  []error
		legitWG   sync.WaitGroup
	)
	legitWG.Go(func() {
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-legitCtx.Done():
				return
			case <-tick.C:
			}
			start := time.Now()
			err := get(context.WithoutCancel(legitCtx), hc, "http://"+routeAddr+"/")
			legitMu.Lock()
			if err != nil {
				failures = append(failures, err)
			} else {
				latencies = append(latencies, time.Since(start))
			}
			legitMu.Unlock()
		}
	})
	t.Cleanup(func() { stopLegit(); legitWG.Wait() })

	floodStart := time.Now()
	idle := holdIdle(t, b.tunnel, floodIdle)
	var flood sync.WaitGroup
	floodCtx, stopFlood := context.WithTimeout(t.Context(), floodDuration)
	defer stopFlood()
	garbage := [][]byte{
		[]byte("\x16\x03\x01\x00\x05garbage that is no ClientHello"),
		[]byte("\x00\xff\x13garbage\x00\x00\x7f"),
		[]byte("GET / HTTP/1.1\r\nHost: b\r\n\r\n"),
	}
	var garbageSent atomic.Int64
	var quicSent int
	for w := range 2 {
		flood.Go(func() {
			for i := 0; floodCtx.Err() == nil; i++ {
				sendGarbage(b.tunnel, garbage[(i+w)%len(garbage)])
				garbageSent.Add(1)
			}
		})
	}
	flood.Go(func() { quicSent = quicJunk(floodCtx, b.tunnel) })
	flood.Wait()
	rssDuring := rss(t, pid)
	for _, c := range idle {
		c.Close()
	}
	stopLegit()
	legitWG.Wait()

	// After: once the proxy has let go of the flood's connections (the silent ones end at
	// its handshake timeout, 10 s by default).
	waitFor(t, 60*time.Second, "the proxy letting go of the flood's descriptors", func() error {
		if n := fds(t, pid); n > fdsBefore+50 {
			return fmt.Errorf("it holds %d descriptors (%d before)", n, fdsBefore)
		}
		return nil
	})
	rssAfter := rss(t, pid)

	if err := b.stop(); err != nil {
		t.Fatalf("proxy b exited with %v", err)
	}
	records, refused := 0, 0
	for _, r := range readAudit(t, b.auditPath()) {
		ts, err := time.Parse(time.RFC3339Nano, fmt.Sprint(r["time"]))
		if err != nil || ts.Before(floodStart) {
			continue
		}
		switch {
		case r["type"] == "refusals":
			records++
			n, _ := r["count"].(float64)
			refused += int(n)
		case r["type"] == "handshake" && r["result"] != "ok":
			records++
			refused++
		}
	}
	if out, errOut, err := runCmd(t.Context(), "audit", "verify", b.auditPath()); err != nil {
		t.Fatalf("audit verify: %v\n%s%s", err, out, errOut)
	}

	legitMu.Lock()
	defer legitMu.Unlock()
	slices.Sort(latencies)
	p99 := time.Duration(0)
	if len(latencies) > 0 {
		p99 = latencies[len(latencies)*99/100]
	}
	fmt.Printf("flood_audit_records=%d\n", records)
	fmt.Printf("flood_refused_attempts=%d garbage_handshakes=%d quic_handshakes=%d idle_connections=%d\n", refused, garbageSent.Load(), quicSent, len(idle))
	fmt.Printf("flood_rss_kib before=%d during=%d after=%d\n", rssBefore, rssDuring, rssAfter)
	fmt.Printf("flood_legit requests=%d failures=%d p99=%s\n", len(latencies)+len(failures), len(failures), p99)
	if len(failures) > 0 {
		t.Errorf("%d legitimate requests failed during the flood, first: %v", len(failures), failures[0])
	}
	if len(latencies) == 0 {
		t.Error("no legitimate request completed during the flood")
	}
	if records > floodRecordsMax {
		t.Errorf("the flood cost %d audit records, want at most %d", records, floodRecordsMax)
	}
	if int64(refused) < garbageSent.Load() {
		t.Errorf("the records count %d refused attempts, fewer than the %d garbage handshakes sent", refused, garbageSent.Load())
	}
}

// startOKPair starts a CA, an HTTP server that answers "ok", proxy b in front of it (with
// extra configuration bExtra) and proxy a with a route to it; it returns b and the route's
// address.
func startOKPair(t *testing.T, bExtra string) (*meshProxy, string) {
	t.Helper()
	ca := startCA(t, time.Minute)
	httpPort := serveHTTP(t, func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") })
	idA := "spiffe://" + trustDomain + "/host/a"
	b := startProxy(t, ca, "b", nil, []service{{port: httpPort, allow: []string{idA}}}, bExtra)
	routeAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	startProxy(t, ca, "a", []route{{listen: routeAddr, peer: b.tunnel, peerID: b.id, targetPort: httpPort}}, nil, "")
	return b, routeAddr
}

// fastRefusals is proxy configuration that writes refusals before authentication every
// 100 ms instead of every 10 s, for tests that wait for them.
const fastRefusals = "limits:\n  refusal_interval: 100ms\n"

// awaitRefusal waits until p's audit log has an inbound refusals record counting reason
// and, unless serial is empty, naming the certificate with that serial among its peers.
func awaitRefusal(t *testing.T, p *meshProxy, reason, serial string, timeout time.Duration) {
	t.Helper()
	waitFor(t, timeout, fmt.Sprintf("%s: a refusals record with reason %s (certificate %q)", p.name, reason, serial), func() error {
		for _, r := range readAudit(t, p.auditPath()) {
			if r["type"] != "refusals" || r["direction"] != "inbound" {
				continue
			}
			if reasons, _ := r["reasons"].(map[string]any); reasons[reason] == nil {
				continue
			}
			if serial == "" {
				return nil
			}
			peers, _ := r["peers"].([]any)
			for _, peer := range peers {
				if m, _ := peer.(map[string]any); m["peer_serial"] == serial && m["reason"] == reason {
					return nil
				}
			}
		}
		return errors.New("none yet")
	})
}

// holdIdle opens n TCP connections to addr that send nothing; they are closed at the
// end of the test if not before.
func holdIdle(t *testing.T, addr string, n int) []net.Conn {
	t.Helper()
	conns := make([]net.Conn, 0, n)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for range n {
		c, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			t.Fatalf("idle connection %d: %v", len(conns), err)
		}
		conns = append(conns, c)
	}
	return conns
}

// sendGarbage writes payload to a new connection to addr and reads until the proxy closes.
func sendGarbage(addr string, payload []byte) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := c.Write(payload); err != nil {
		return
	}
	_, _ = io.Copy(io.Discard, c)
}

// quicJunk sends random datagrams and QUIC handshakes without a client certificate to the
// UDP port of addr until ctx is done, and returns how many handshakes it tried.
func quicJunk(ctx context.Context, addr string) int {
	if u, err := net.Dial("udp", addr); err == nil {
		junk := make([]byte, 1200)
		for range 2000 {
			_, _ = rand.Read(junk)
			_, _ = u.Write(junk)
		}
		u.Close()
	}
	tried := 0
	for ctx.Err() == nil {
		hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		conn, err := quic.DialAddr(hctx, addr, &tls.Config{
			InsecureSkipVerify: true, //nolint:gosec,forbidigo // junk: the server refuses us, we do not check it
			NextProtos:         []string{"agentmesh-quic/1"},
		}, &quic.Config{HandshakeIdleTimeout: 5 * time.Second})
		cancel()
		if err == nil {
			// TLS 1.3: the client finishes before the server has checked that no certificate
			// came; the server's refusal arrives as the connection's end.
			<-conn.Context().Done()
		}
		tried++
	}
	return tried
}

// fds is the number of open file descriptors of process pid.
func fds(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// rss is the resident set size of process pid in KiB, from /proc/PID/status.
func rss(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil {
				t.Fatalf("VmRSS %q: %v", v, err)
			}
			return n
		}
	}
	t.Fatalf("no VmRSS in /proc/%d/status", pid)
	return 0
}

// adminGet fetches path from p's admin port and returns the status code and body.
func adminGet(t *testing.T, p *meshProxy, path string) (int, string) {
	t.Helper()
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Get("http://" + p.admin + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(body)
}

// TestAuditDiskFull: the proxy's audit log lives on a small tmpfs that fills up. The proxy
// fails closed (new connections are refused), /readyz says why, and once space returns it
// recovers by itself within 5 s, without a restart. Afterwards `agentmesh audit verify`
// passes and every handshake a client saw succeed is in the log.
func TestAuditDiskFull(t *testing.T) {
	requireE2E(t)
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	vol := t.TempDir()
	if out, errOut, err := runCmdOut(t, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", vol); err != nil {
		t.Fatalf("mount tmpfs: %v %s%s", err, out, errOut)
	}
	// Registered first, so it runs last: after the proxies have stopped.
	t.Cleanup(func() {
		// Not runCmdOut: the test's context is done by now.
		if out, err := exec.Command("umount", vol).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v %s", vol, err, out)
		}
	})
	logPath := vol + "/audit.log"
	b, routeAddr := startOKPair(t, "audit:\n  path: "+logPath+"\n")
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	succeeded := 0
	request := func() error {
		err := get(t.Context(), hc, "http://"+routeAddr+"/")
		if err == nil {
			succeeded++
		}
		return err
	}
	for range 5 {
		if err := request(); err != nil {
			t.Fatalf("request before the volume filled: %v", err)
		}
	}

	// Fill the volume, then make requests until the proxy refuses one: its handshake
	// record could not be made durable.
	filler := vol + "/filler"
	fillVolume(t, filler)
	refused := false
	for i := 0; i < 200 && !refused; i++ {
		refused = request() != nil
	}
	if !refused {
		t.Fatal("200 requests succeeded through a proxy whose audit volume is full")
	}
	code, body := adminGet(t, b, "/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "audit") {
		t.Fatalf("/readyz with the audit volume full: %d %q, want 503 naming the audit log", code, body)
	}
	if got := metricValue(t, b, "agentmesh_audit_unavailable"); got != 1 {
		t.Errorf("agentmesh_audit_unavailable = %v with the volume full, want 1", got)
	}
	if err := request(); err == nil {
		t.Fatal("a request succeeded while the audit log was failing: the proxy did not fail closed")
	}

	// Space returns: ready again without a restart (the audit log retries on its own;
	// the deadline leaves room for a loaded machine under -race).
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	recovered := awaitReady(t, b, 30*time.Second)
	fmt.Printf("audit_recovery=%s\n", recovered.Round(time.Millisecond))
	for range 5 {
		if err := request(); err != nil {
			t.Fatalf("request after recovery: %v", err)
		}
	}
	if got := metricValue(t, b, "agentmesh_audit_unavailable"); got != 0 {
		t.Errorf("agentmesh_audit_unavailable = %v after recovery, want 0", got)
	}

	if err := b.stop(); err != nil {
		t.Fatalf("proxy b exited with %v", err)
	}
	if out, errOut, err := runCmd(t.Context(), "audit", "verify", logPath); err != nil {
		t.Fatalf("audit verify: %v\n%s%s", err, out, errOut)
	}
	ok := 0
	for _, r := range readAudit(t, logPath) {
		if r["type"] == "handshake" && r["direction"] == "inbound" && r["result"] == "ok" {
			ok++
		}
	}
	fmt.Printf("audit_disk_full requests_succeeded=%d inbound_ok_records=%d\n", succeeded, ok)
	if ok < succeeded {
		t.Errorf("%d requests succeeded but only %d inbound handshakes are in the log", succeeded, ok)
	}
}

// fillVolume writes path until its volume is full.
func fillVolume(t *testing.T, path string) {
	t.Helper()
	// Larger than the volume: WriteFile writes what fits and reports ENOSPC.
	if err := os.WriteFile(path, make([]byte, 4<<20), 0o600); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("filling the volume: %v, want ENOSPC", err)
	}
}
