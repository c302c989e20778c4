package main

import (
	"strings"
	"testing"
)

// `redirect install --dry-run` turns its flags into the rules it would install, and a
// bad port or prefix is refused naming its flag before iptables is touched.
func TestRedirectInstallDryRun(t *testing.T) {
	t.Parallel()
	out, err := runRoot(t, "redirect", "install", "--dry-run", "--ipv6=false", "--exclude-uid", "0",
		"--outbound-port", "16001", "--strict-port", "8080", "--exclude-cidr", "10.0.0.0/8")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"-A AGENTMESH_OUTPUT -m owner --uid-owner 0 -j RETURN",
		"-A AGENTMESH_OUTPUT -d 10.0.0.0/8 -j RETURN",
		"-A AGENTMESH_OUTPUT -p tcp -j REDIRECT --to-ports 16001",
		"--dport 8080 -j REDIRECT --to-ports 15006",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("dry run lacks %q:\n%s", want, out)
		}
	}
	for flag, args := range map[string][]string{
		"--inbound-port": {"--inbound-port", "0"},
		"--strict-port":  {"--strict-port", "70000"},
		"--exclude-port": {"--exclude-port", "8080,0"},
		"--include-cidr": {"--include-cidr", "10.0.0.300/8"},
	} {
		_, err := runRoot(t, append([]string{"redirect", "install", "--dry-run", "--ipv6=false", "--exclude-uid", "0"}, args...)...)
		if err == nil || !strings.HasPrefix(err.Error(), flag+":") {
			t.Errorf("%v: %v, want an error naming %s", args, err, flag)
		}
	}
}
