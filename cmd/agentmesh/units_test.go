package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// installedBinary is where the systemd units expect the agentmesh binary.
const installedBinary = "/usr/local/bin/agentmesh"

// TestSystemdUnits runs systemd-analyze verify on every unit in deploy/systemd, with the
// binary path pointed at an executable that exists here, and fails on any complaint
// (systemd-analyze exits 0 on warnings such as an unknown address family). It also checks
// that the proxy unit keeps what capture needs: AF_NETLINK for the socket-owner lookup
// and CAP_NET_ADMIN for the packet mark.
func TestSystemdUnits(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("systemd-analyze not installed: run make deps")
		}
		t.Skip("systemd-analyze not installed: run make deps")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	units, err := filepath.Glob("../../deploy/systemd/*.service")
	if err != nil || len(units) < 2 {
		t.Fatalf("units found: %v (%v)", units, err)
	}
	dir := t.TempDir()
	for _, u := range units {
		data, err := os.ReadFile(u)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(data), installedBinary) {
			t.Errorf("%s does not run %s", u, installedBinary)
		}
		copyPath := filepath.Join(dir, filepath.Base(u))
		if err := os.WriteFile(copyPath, []byte(strings.ReplaceAll(string(data), installedBinary, self)), 0o644); err != nil {
			t.Fatal(err)
		}
		cmd := exec.CommandContext(t.Context(), analyze, "verify", "--man=no", copyPath)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err != nil || len(strings.TrimSpace(string(out))) > 0 {
			t.Errorf("systemd-analyze verify %s: %v\n%s", filepath.Base(u), err, out)
		}
	}

	proxy := unitSettings(t, "../../deploy/systemd/agentmesh-proxy.service")
	for _, want := range []struct{ key, value string }{
		{"RestrictAddressFamilies", "AF_NETLINK"},
		{"CapabilityBoundingSet", "CAP_NET_ADMIN"},
		{"AmbientCapabilities", "CAP_NET_ADMIN"},
	} {
		if !slices.Contains(proxy[want.key], want.value) {
			t.Errorf("agentmesh-proxy.service: %s=%v lacks %s", want.key, proxy[want.key], want.value)
		}
	}
}

// unitSettings returns the words of each key=value line of a unit file.
func unitSettings(t *testing.T, path string) map[string][]string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	for _, line := range strings.Split(string(data), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(line, "#") {
			out[k] = append(out[k], strings.Fields(v)...)
		}
	}
	return out
}
