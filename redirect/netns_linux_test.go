package redirect

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// The real tests need root, iproute2 and iptables, and work only inside network namespaces
// they create, so the host's rules are never touched.

// requireNetns skips the test unless it can create network namespaces and run the named
// tools in them.
func requireNetns(t *testing.T, tools ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces and program iptables")
	}
	for _, tool := range append([]string{"ip"}, tools...) {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (apt-get install -y iptables iproute2): %v", tool, err)
		}
	}
}

// newNetns creates a fresh network namespace, deleted when the test ends, and returns its
// name. If the kernel or the container refuses, the test is skipped with the reason.
func newNetns(t *testing.T) string {
	t.Helper()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	name := "agentmesh-r-" + hex.EncodeToString(b)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Skipf("cannot create a network namespace: ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	return name
}

// inNetns is the Config.Command that runs the iptables tools inside network namespace ns.
func inNetns(ns string) func(ctx context.Context, name string, arg ...string) *exec.Cmd {
	return func(ctx context.Context, name string, arg ...string) *exec.Cmd {
		return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, name}, arg...)...)
	}
}

// nsRun runs a command in ns (stdin optional) and returns its stdout; failure ends the test.
// It does not use t.Context, so it also works in Cleanup functions.
func nsRun(t *testing.T, ns, stdin string, name string, arg ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := inNetns(ns)(ctx, name, arg...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("ip netns exec %s %s %s: %v: %s", ns, name, strings.Join(arg, " "), err, stderr.String())
	}
	return string(out)
}

var saveCounters = regexp.MustCompile(`\[\d+:\d+\]`)

// normalizeSave drops iptables-save's comment and timestamp lines and zeroes the counters,
// which change with traffic, so two saves of the same rules compare equal.
func normalizeSave(out string) string {
	var b strings.Builder
	for line := range strings.Lines(out) {
		if strings.HasPrefix(line, "#") {
			continue
		}
		b.WriteString(saveCounters.ReplaceAllString(line, "[0:0]"))
	}
	return b.String()
}

// recorder wraps a Config.Command and remembers every command it built.
type recorder struct {
	next func(ctx context.Context, name string, arg ...string) *exec.Cmd
	mu   sync.Mutex
	cmds []recorded
}

type recorded struct {
	name string
	cmd  *exec.Cmd
}

func (r *recorder) command(ctx context.Context, name string, arg ...string) *exec.Cmd {
	cmd := r.next(ctx, name, arg...)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cmds = append(r.cmds, recorded{name, cmd})
	return cmd
}

// take returns the commands recorded since the last call, by tool name.
func (r *recorder) take() []recorded {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.cmds
	r.cmds = nil
	return out
}

func names(rs []recorded) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.name
	}
	return out
}
