package proxy_test

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
)

// agentDialEnv, when set, makes TestAgentProcess the body of a child
// process: it dials the address it names (see runAgent).
const agentDialEnv = "AGENTMESH_TEST_AGENT_DIAL"

// nobody is the uid (and gid) the child agent runs as.
const nobody = 65534

// TestAgentProcess is the agent that runAgent starts as another user: it
// connects to the address in agentDialEnv, sends one line, half-closes and
// prints what came back. Run directly, it skips.
func TestAgentProcess(t *testing.T) {
	addr := os.Getenv(agentDialEnv)
	if addr == "" {
		t.Skip("the body of a child process started by runAgent")
	}
	c, err := net.DialTimeout("tcp", addr, waitLimit)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(waitLimit))
	msg := fmt.Sprintf("hello from uid %d", os.Getuid())
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("echo: %s\n", got)
}

// runAgent runs TestAgentProcess as uid against addr and returns what it
// printed. The test binary is copied where that user may run it: go test
// builds it in a directory only we can enter.
func runAgent(t *testing.T, uid uint32, addr string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "agentmesh-agent-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil { //nolint:gosec // another user runs the binary
		t.Fatal(err)
	}
	bin, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "agent.test")
	if err := os.WriteFile(exe, bin, 0o755); err != nil { //nolint:gosec // another user runs it
		t.Fatal(err)
	}
	cmd := exec.CommandContext(t.Context(), exe, "-test.run=^TestAgentProcess$", "-test.count=1", "-test.v")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), agentDialEnv+"="+addr)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("agent as uid %d: %v:\n%s", uid, err, out)
	}
	return string(out)
}

// TestAttestedChildProcess: a process running as another user connects to
// A's route; its uid is registered to agent x, so B sees agent x's SVID,
// while this process's own connection (its uid is no agent's) presents the
// host identity.
func TestAttestedChildProcess(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs a child process as another user")
	}
	agents := newAgents()
	m := agentMesh(t, agents, nil)
	agents.add(nobody, agentX, testca.NewCredentials(m.ca, m.ca.SVID(t, agentX)))

	fromA, fromB := m.a.audit.len(), m.b.audit.len()
	out := runAgent(t, nobody, m.a.RouteAddr(0).String())
	if want := fmt.Sprintf("echo: hello from uid %d", nobody); !strings.Contains(out, want) {
		t.Fatalf("agent printed:\n%s\nwant %q", out, want)
	}
	in := nextHandshake(t, m.b, fromB)
	if in.Result != "ok" || in.PeerID != agentX.String() {
		t.Errorf("B's record %+v, want ok from %s", in, agentX)
	}
	rec := waitForFrom(t, m.a.audit, fromA, "A's connection record", func(audit.Connection) bool { return true })
	if rec.LocalID != agentX.String() || rec.BytesOut == 0 {
		t.Errorf("A's connection record %+v, want local_id %s and bytes", rec, agentX)
	}

	fromB = m.b.audit.len()
	_ = m.connect(t, "from this process").Close()
	if in := nextHandshake(t, m.b, fromB); in.PeerID != idA.String() {
		t.Errorf("B's record %+v for this process's connection, want the host identity %s", in, idA)
	}
	if a, h := m.a.attestations(t, "agent"), m.a.attestations(t, "host"); a != 1 || h != 1 {
		t.Errorf("attestations agent %v host %v, want 1 and 1", a, h)
	}
}
