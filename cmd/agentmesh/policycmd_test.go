package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agentmesh/agentmesh/node"
)

const testPolicy = `inbound:
  - name: planner-to-search
    from: [spiffe://example.org/agent/planner]
    to: {ports: [8080], id: spiffe://example.org/agent/search}
outbound:
  - name: planner-calls-search
    from: [spiffe://example.org/agent/planner]
    to: [spiffe://example.org/agent/search, passthrough:203.0.113.0/24]
`

// runRoot runs the command line args and returns its stdout and error.
func runRoot(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRoot()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.ExecuteContext(t.Context())
	return out.String(), err
}

func TestPolicyCommands(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	good, bad := filepath.Join(dir, "good.yaml"), filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(good, []byte(testPolicy), 0o600); err != nil {
		t.Fatal(err)
	}
	broken := strings.Replace(testPolicy, "agent/search}", "agent/search/*x}", 1)
	if err := os.WriteFile(bad, []byte(broken), 0o600); err != nil {
		t.Fatal(err)
	}

	if out, err := runRoot(t, "policy", "check", good); err != nil || !strings.Contains(out, "ok (1 inbound, 1 outbound rules)") {
		t.Fatalf("check good: %v %q", err, out)
	}
	_, err := runRoot(t, "policy", "check", bad)
	var fe *node.FileError
	if !errors.As(err, &fe) || fe.File != bad || fe.Line != 4 || fe.Field != "inbound[0].to.id" {
		t.Fatalf("check bad: %v, want %s:4 inbound[0].to.id", err, bad)
	}

	out, err := runRoot(t, "policy", "explain", "--policy", good, "--port", "8080",
		"spiffe://example.org/agent/planner", "spiffe://example.org/agent/search")
	if err != nil || !strings.Contains(out, `rule: outbound[0] "planner-calls-search"`) || !strings.Contains(out, `rule: inbound[0] "planner-to-search"`) {
		t.Fatalf("explain planner: %v\n%s", err, out)
	}
	out, err = runRoot(t, "policy", "explain", "--policy", good, "--port", "8080",
		"spiffe://example.org/agent/scraper", "spiffe://example.org/agent/search")
	var code exitError
	if !errors.As(err, &code) || code != 3 || !strings.Contains(out, "deny: no inbound rule allows spiffe://example.org/agent/scraper") {
		t.Fatalf("explain scraper: %v\n%s", err, out)
	}
	// A prefix of the planner's name is not the planner.
	if _, err := runRoot(t, "policy", "explain", "--policy", good, "--port", "8080",
		"spiffe://example.org/agent/plan", "spiffe://example.org/agent/search"); !errors.As(err, &code) {
		t.Fatalf("explain for a prefix of the planner's ID allowed: %v", err)
	}
	// Destinations outside the mesh.
	out, err = runRoot(t, "policy", "explain", "--policy", good, "spiffe://example.org/agent/planner", "passthrough:203.0.113.7")
	if err != nil || !strings.Contains(out, "allow: outbound rule \"planner-calls-search\" allows spiffe://example.org/agent/planner to pass through to 203.0.113.7") {
		t.Fatalf("explain passthrough: %v\n%s", err, out)
	}
	if out, err := runRoot(t, "policy", "explain", "--policy", good, "spiffe://example.org/agent/planner", "passthrough:198.51.100.1"); !errors.As(err, &code) || code != 3 {
		t.Fatalf("explain passthrough elsewhere: %v\n%s", err, out)
	}
}
