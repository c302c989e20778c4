package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestMalformedConfig: the proxy refuses a bad configuration with file, line and field,
// and exits non-zero before it starts anything.
func TestMalformedConfig(t *testing.T) {
	requireE2E(t)
	path := filepath.Join(t.TempDir(), "proxy.yaml")
	writeFile(t, path, `id: spiffe://example.org/host/a
state: state
ca:
  url: https://127.0.0.1:9443
  root: root.crt
routes:
  - listen: 127.0.0.1:18080
    peer: 127.0.0.1:15008
    peer_id: not-a-spiffe-id
    target_port: 8080
`)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	_, stderr, err := runCmd(ctx, "proxy", "--config", path)
	if err == nil {
		t.Fatal("proxy accepted a malformed config")
	}
	if want := path + ":9: routes[0].peer_id:"; !strings.Contains(stderr, want) {
		t.Fatalf("stderr %q does not contain %q", stderr, want)
	}
}

// TestHostilePeers: garbage bytes and plain-TCP clients on the tunnel port are refused
// and audited, and the proxy keeps serving the mesh.
func TestHostilePeers(t *testing.T) {
	requireE2E(t)
	b, routeAddr := startOKPair(t, "")

	hostile := []struct {
		name    string
		payload []byte
		reason  string
	}{
		{name: "garbage", payload: []byte("\x00\xff\x13garbage\x00\x00\x7f"), reason: "not_tls"},
		{name: "plain HTTP", payload: []byte("GET / HTTP/1.1\r\nHost: b\r\n\r\n"), reason: "not_tls"},
		{name: "broken TLS record", payload: []byte("\x16\x03\x01\x00\x05garbage that is no ClientHello"), reason: "handshake_failed"},
	}
	for _, h := range hostile {
		name, payload := h.name, h.payload
		c, err := net.DialTimeout("tcp", b.tunnel, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(15 * time.Second))
		if _, err := c.Write(payload); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		// The proxy answers with at most a TLS alert and closes.
		reply, _ := io.ReadAll(c)
		c.Close()
		if strings.Contains(string(reply), "HTTP/") {
			t.Fatalf("%s: the tunnel port answered in clear: %q", name, reply)
		}
	}

	resp, err := (&http.Client{Timeout: 10 * time.Second}).Get("http://" + routeAddr + "/")
	if err != nil {
		t.Fatalf("mesh request after hostile peers: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "ok" {
		t.Fatalf("mesh request answered %q", body)
	}

	if err := b.stop(); err != nil {
		t.Fatalf("proxy b exited with %v", err)
	}
	want := map[string]int{}
	for _, h := range hostile {
		want[h.reason]++
	}
	// Refused before authentication: counted per source in refusals records.
	got := map[string]int{}
	for _, r := range readAudit(t, b.auditPath()) {
		if r["type"] == "refusals" && r["direction"] == "inbound" {
			reasons, _ := r["reasons"].(map[string]any)
			for reason, n := range reasons {
				f, _ := n.(float64)
				got[reason] += int(f)
			}
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("refused handshakes audited by reason: %v, want %v", got, want)
	}
}

// readAudit returns every record of an audit log as a map, leaving out a last line that
// a running proxy is still writing.
func readAudit(t *testing.T, path string) []map[string]any {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }() // read only
	var out []map[string]any
	var torn error
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		var r map[string]any
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			torn = fmt.Errorf("%s: %w", path, err)
			continue
		}
		if torn != nil {
			t.Fatal(torn) // only the last line may be incomplete
		}
		out = append(out, r)
	}
	return out
}
