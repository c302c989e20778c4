package audit_test

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/audit"
)

// TestRecoversFromFullDisk fills a small tmpfs under the log: the log refuses records
// while writes fail, and once space returns it accepts them again by itself, with every
// acknowledged record in an unbroken chain and the failed batch written after them.
func TestRecoversFromFullDisk(t *testing.T) {
	dir := tmpfs(t, "256k")
	path := filepath.Join(dir, "audit.log")
	reg := prometheus.NewRegistry()
	l := start(t, audit.Config{Path: path, Registerer: reg, RetryInterval: 10 * time.Millisecond})

	// Acknowledged records, then a filler that takes the rest of the volume.
	for i := range 10 {
		if err := l.Append(handshake(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Sync(t.Context()); err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(dir, "filler")
	fill(t, filler)

	// A batch bigger than the buffer so part of it reaches the file before the failure.
	var syncErr error
	for i := 10; i < 2000 && syncErr == nil; i++ {
		if err := l.Append(handshake(i)); err != nil {
			syncErr = err
			break
		}
		if i%200 == 0 {
			syncErr = l.Sync(t.Context())
		}
	}
	if syncErr == nil {
		syncErr = l.Sync(t.Context())
	}
	if !errors.Is(syncErr, audit.ErrUnavailable) || !errors.Is(syncErr, syscall.ENOSPC) {
		t.Fatalf("Sync on a full volume = %v, want ErrUnavailable wrapping ENOSPC", syncErr)
	}
	if err := l.Append(handshake(-1)); !errors.Is(err, audit.ErrUnavailable) {
		t.Fatalf("Append while failing = %v, want ErrUnavailable", err)
	}
	if got := gauge(t, reg, "agentmesh_audit_unavailable"); got != 1 {
		t.Errorf("agentmesh_audit_unavailable = %v while failing, want 1", got)
	}
	// Nothing half-written: the file ends with the last acknowledged record.
	if b := readFile(t, path); len(b) > 0 && !bytes.HasSuffix(b, []byte("\n")) {
		t.Fatalf("the log ends in a torn line while failing")
	}
	if n, err := verifyFile(t, path); err != nil || n < 10 {
		t.Fatalf("Verify while failing = %d, %v; want >= 10 records, nil", n, err)
	}

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	deadline := time.After(5 * time.Second)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for l.Err() != nil {
		select {
		case <-deadline:
			t.Fatalf("still failing 5s after space returned: %v", l.Err())
		case <-tick.C:
		}
	}
	if err := l.Append(handshake(9999)); err != nil {
		t.Fatalf("Append after recovery: %v", err)
	}
	if err := l.Sync(t.Context()); err != nil {
		t.Fatalf("Sync after recovery: %v", err)
	}
	if got := gauge(t, reg, "agentmesh_audit_unavailable"); got != 0 {
		t.Errorf("agentmesh_audit_unavailable = %v after recovery, want 0", got)
	}
	if err := l.stop(); err != nil {
		t.Fatalf("Run = %v after recovery, want nil", err)
	}
	n, err := verifyFile(t, path)
	if err != nil {
		t.Fatalf("Verify after recovery: %v", err)
	}
	// The first ten, the failed batch (rewritten after recovery) and the last one.
	ls := lines(readFile(t, path))
	if n != len(ls) || n < 12 || !bytes.Contains(ls[9], []byte(`"duration_ns":9000000,`)) ||
		!bytes.Contains(ls[n-1], []byte(`"duration_ns":9999000000,`)) {
		t.Fatalf("records after recovery: %d lines, last %s", n, ls[n-1])
	}
}

// tmpfs mounts a tmpfs of size on a temporary directory until the test ends.
func tmpfs(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

// fill writes path until the volume is full.
func fill(t *testing.T, path string) {
	t.Helper()
	// Larger than the volume: WriteFile writes what fits and reports ENOSPC.
	if err := os.WriteFile(path, make([]byte, 1<<20), 0o600); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("filling the volume: %v, want ENOSPC", err)
	}
}

func gauge(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatalf("no gauge %s", name)
	return 0
}
