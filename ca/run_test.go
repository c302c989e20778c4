package ca

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

// freeAddr returns a loopback TCP address nothing listens on at the moment.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	if err := ln.Close(); err != nil {
		t.Fatal(err)
	}
	return addr
}

// Run wires the process: a metrics address it cannot bind fails the start and releases
// the state directory, so the next start on it works; that one serves the admin socket
// and the metrics, writes its audit log to StateDir/audit.log by default, and returns
// nil on cancellation with the last records on disk.
func TestRun(t *testing.T) {
	requireSoftHSM(t)
	cfg, _ := testConfig(t)
	logger, _ := newTestLogger(t)
	cfg.Logger = nil // Run derives it from the process logger
	bad := ProcessConfig{CA: cfg, Logger: logger, MetricsAddr: "127.0.0.1:notaport"}
	if err := Run(t.Context(), bad); err == nil || !strings.Contains(err.Error(), "metrics") {
		t.Fatalf("Run with a bad metrics address = %v, want a metrics error", err)
	}

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	metrics := freeAddr(t)
	done := make(chan error, 1)
	go func() { done <- Run(ctx, ProcessConfig{CA: cfg, Logger: logger, MetricsAddr: metrics}) }()

	var fr *meshapi.FleetRotation
	deadline := time.Now().Add(time.Minute)
	for {
		var err error
		if fr, err = RequestFleetRotation(ctx, cfg.StateDir, "test"); err == nil {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("Run returned before serving: %v", err)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("admin socket never answered: %v", err)
		}
	}
	resp, err := http.Get("http://" + metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "go_goroutines") {
		t.Fatalf("GET /metrics: %d\n%s", resp.StatusCode, body)
	}

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run after cancellation = %v, want nil", err)
	}
	f, err := os.Open(filepath.Join(cfg.StateDir, "audit.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }() // read only
	n, err := audit.Verify(f)
	if err != nil || n == 0 {
		t.Fatalf("audit log after fleet rotation %d: %d records, %v", fr.ID, n, err)
	}
	// The log signed a checkpoint of all of it at shutdown, under the CA's origin.
	msg, err := os.ReadFile(filepath.Join(cfg.StateDir, "audit.log.checkpoint"))
	if err != nil {
		t.Fatal(err)
	}
	text, sigs, _ := strings.Cut(string(msg), "\n\n")
	c, err := audit.ParseCheckpoint(text + "\n")
	if err != nil || c.Origin != meshapi.CAAuditOrigin(cfg.TrustDomain) || c.Size != uint64(n) ||
		!strings.HasPrefix(sigs, "— "+c.Origin+" ") {
		t.Errorf("the ca's last checkpoint: %+v, %v\n%s", c, err, msg)
	}
}

func TestParseHostClaim(t *testing.T) {
	t.Parallel()
	host := testTD.ID()
	for _, tc := range []struct {
		name  string
		path  string
		addrs []string
		want  []string // nil when refused
	}{
		{"host", "/host/a", []string{"10.0.0.0/24", "fd00::1"}, []string{"10.0.0.0/24", "fd00::1/128"}},
		{"an agent", "/agent/a", []string{"10.0.0.1"}, nil},
		{"a nested host", "/host/a/b", []string{"10.0.0.1"}, nil},
		{"host bits set", "/host/a", []string{"10.0.0.1/24"}, nil},
		{"every address", "/host/a", []string{"0.0.0.0/0"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			id, err := host.ReplacePath(tc.path)
			if err != nil {
				t.Fatal(err)
			}
			got, err := ParseHostClaim(id, tc.addrs)
			if tc.want == nil {
				if !errors.Is(err, ErrInvalidRequest) {
					t.Fatalf("ParseHostClaim(%s, %v) = %v, %v; want ErrInvalidRequest", id, tc.addrs, got, err)
				}
				return
			}
			if err != nil || len(got) != len(tc.want) {
				t.Fatalf("ParseHostClaim(%s, %v) = %v, %v", id, tc.addrs, got, err)
			}
			for i, p := range got {
				if p.String() != tc.want[i] {
					t.Errorf("prefix %d = %s, want %s", i, p, tc.want[i])
				}
			}
			if !meshapi.IsHostID(id) {
				t.Errorf("meshapi.IsHostID(%s) = false", id)
			}
		})
	}
	if meshapi.IsHostID(testTD.ID()) {
		t.Error("the trust domain's own ID is a host ID")
	}
}
