package e2e

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/internal/softhsmtest"
)

// binary is the agentmesh binary under test, built once by TestMain; demoService is
// a plain HTTP server that knows nothing of the mesh.
var binary, demoService string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	flag.Parse()
	if testing.Short() || os.Getenv("AGENTMESH_SKIP_E2E") != "" {
		fmt.Println("e2e: skipped (-short)")
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "agentmesh-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer func() {
		if err := os.RemoveAll(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
		}
	}()
	binary = filepath.Join(dir, "agentmesh")
	args := []string{"build", "-o", binary}
	if raceEnabled {
		args = append(args, "-race")
	}
	build := exec.Command("go", append(args, "../cmd/agentmesh")...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: build agentmesh:", err)
		return 1
	}
	demoService = filepath.Join(dir, "demoservice")
	if out, err := exec.Command("go", "build", "-o", demoService, "../internal/demoservice").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: build demoservice: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

func requireE2E(t *testing.T) {
	t.Helper()
	if binary == "" {
		t.Skip("e2e tests need the built binary (not with -short)")
	}
	softhsmtest.Require(t)
}

// process is a running agentmesh subcommand (or a test's helper process) whose output
// is kept, to show when a test fails.
type process struct {
	t    *testing.T
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error

	mu       sync.Mutex
	lines    []string
	watchers []*watcher
}

type watcher struct {
	re *regexp.Regexp
	ch chan string
}

// startCmd runs cmd; its stderr is kept and shown when the test fails. It is stopped
// with SIGTERM when the test ends.
func startCmd(t *testing.T, name string, cmd *exec.Cmd) *process {
	t.Helper()
	p := &process{t: t, name: name, cmd: cmd, done: make(chan struct{})}
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	p.cmd.Stdout = io.Discard
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go p.read(stderr)
	t.Cleanup(func() {
		// A test that cares how the process ended calls stop itself and checks.
		err := p.stop()
		if t.Failed() {
			t.Logf("%s: exit: %v", name, err)
			t.Logf("%s: rotation log lines:\n%s", name, p.grep("rotat", 20))
			t.Logf("%s: last log lines:\n%s", name, p.tail(20))
		}
	})
	return p
}

func (p *process) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		p.mu.Lock()
		p.lines = append(p.lines, line)
		for _, w := range p.watchers {
			if w.re.MatchString(line) {
				select {
				case w.ch <- line:
				default:
				}
			}
		}
		p.mu.Unlock()
	}
	p.err = p.cmd.Wait()
	close(p.done)
}

// awaitOutput waits for a line of output matching pattern and returns it. It is for the
// output of the tests' own clients (a response body a shell prints); agentmesh's log
// lines are for people, and tests wait on its audit records, status and metrics.
func (p *process) awaitOutput(pattern string, timeout time.Duration) string {
	p.t.Helper()
	w := &watcher{re: regexp.MustCompile(pattern), ch: make(chan string, 1)}
	p.mu.Lock()
	for _, l := range p.lines {
		if w.re.MatchString(l) {
			p.mu.Unlock()
			return l
		}
	}
	p.watchers = append(p.watchers, w)
	p.mu.Unlock()
	select {
	case l := <-w.ch:
		return l
	case <-p.done:
		p.t.Fatalf("%s exited (%v) before printing %q:\n%s", p.name, p.err, pattern, p.output())
	case <-time.After(timeout):
		p.t.Fatalf("%s did not print %q within %v:\n%s", p.name, pattern, timeout, p.output())
	}
	return ""
}

// tail returns the last n log lines that are not at Debug level.
func (p *process) tail(n int) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for i := len(p.lines) - 1; i >= 0 && len(out) < n; i-- {
		if !strings.Contains(p.lines[i], "level=DEBUG") {
			out = append(out, p.lines[i])
		}
	}
	slices.Reverse(out)
	return strings.Join(out, "\n")
}

// grep returns the first n log lines containing s.
func (p *process) grep(s string, n int) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, l := range p.lines {
		if strings.Contains(l, s) && len(out) < n {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func (p *process) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.lines, "\n")
}

// stop sends SIGTERM and waits for the process to exit, killing it after 15 s.
func (p *process) stop() error {
	select {
	case <-p.done:
		return p.err
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
		p.t.Errorf("%s did not stop within 15 s of SIGTERM", p.name)
	}
	return p.err
}

// runCmd runs the binary to completion and returns its stdout, stderr and exit error.
func runCmd(ctx context.Context, args ...string) (string, string, error) {
	cmd := exec.CommandContext(ctx, binary, args...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

// runCmdOut runs any command to completion and returns its stdout, stderr and error.
func runCmdOut(t *testing.T, name string, args ...string) (string, string, error) {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// waitFor polls check every 100 ms until it returns nil, and fails the test with what
// and check's last error once timeout has passed. Every wait of these tests goes
// through it: on an audit record, a metric, /readyz, status --json or a state file.
func waitFor(t *testing.T, timeout time.Duration, what string, check func() error) {
	t.Helper()
	waitForEvery(t, 100*time.Millisecond, timeout, what, check)
}

// waitForEvery is waitFor polling every interval: for a state that lasts only a moment.
func waitForEvery(t *testing.T, interval, timeout time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %v", what, timeout, err)
		}
		time.Sleep(interval) //nolint:forbidigo // the poll interval of a wait on a condition
	}
}
