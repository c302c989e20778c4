package e2e

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/ca"
)

const trustDomain = "example.org"

// meshCA is a running `agentmesh ca`.
type meshCA struct {
	*process
	state string
	url   string
	// root is the trust-bundle file proxies are configured with: the CA's root unless
	// a test sets another.
	root string
	// h and args are where and how it runs, for restart.
	h    host
	args []string
}

func startCA(t *testing.T, lifetime time.Duration) *meshCA {
	t.Helper()
	return startCAOn(t, host{}, fmt.Sprintf("127.0.0.1:%d", freePort(t)), lifetime)
}

// startCAOn runs the CA on h, listening on listen (host:port), with extra arguments.
func startCAOn(t *testing.T, h host, listen string, lifetime time.Duration, extra ...string) *meshCA {
	t.Helper()
	return startCAIn(t, h, listen, lifetime, filepath.Join(t.TempDir(), "ca"), extra...)
}

// startCAIn runs the CA on h with the state directory state (a new one, or one a
// stopped CA left: a restart) and extra arguments.
func startCAIn(t *testing.T, h host, listen string, lifetime time.Duration, state string, extra ...string) *meshCA {
	t.Helper()
	ip, _, _ := net.SplitHostPort(listen)
	args := append([]string{"ca", "--state", state, "--trust-domain", trustDomain,
		"--listen", listen, "--dns-name", ip, "--svid-lifetime", lifetime.String(), "--log-level", "debug"}, extra...)
	c := &meshCA{process: startCmd(t, "ca", h.command(binary, args...)), state: state, url: "https://" + listen,
		root: filepath.Join(state, "root.crt"), h: h, args: args}
	c.awaitAdmin(t, "the ca")
	return c
}

// restart stops the CA and starts it again on the same state directory, and waits
// until its admin socket answers.
func (c *meshCA) restart(t *testing.T) {
	t.Helper()
	if err := c.stop(); err != nil {
		t.Fatalf("stop the ca: %v", err)
	}
	c.process = startCmd(t, "ca", c.h.command(binary, c.args...))
	c.awaitAdmin(t, "the restarted ca")
}

// awaitAdmin waits until the CA answers on its admin socket, which it serves once it
// runs.
func (c *meshCA) awaitAdmin(t *testing.T, what string) {
	t.Helper()
	waitFor(t, 60*time.Second, what+" answering on its admin socket", func() error {
		select {
		case <-c.done:
			t.Fatalf("the ca exited (%v):\n%s", c.err, c.tail(20))
		default:
		}
		_, err := ca.RequestDirectory(t.Context(), c.state)
		return err
	})
}

// host is where a process runs: the test's own network namespace, or ns.
type host struct{ ns string }

func (h host) command(name string, args ...string) *exec.Cmd {
	if h.ns == "" {
		return exec.Command(name, args...)
	}
	return exec.Command("ip", append([]string{"netns", "exec", h.ns, name}, args...)...)
}

// token asks the CA for a bootstrap token for id and writes it to a file.
func (c *meshCA) token(t *testing.T, id, path string) {
	t.Helper()
	out, errOut, err := runCmd(t.Context(), "token", "--state", c.state, id)
	if err != nil {
		t.Fatalf("agentmesh token %s: %v\n%s", id, err, errOut)
	}
	writeFile(t, path, strings.TrimSpace(out)+"\n")
}

// meshProxy is a running `agentmesh proxy`.
type meshProxy struct {
	*process
	id     string
	dir    string
	tunnel string
	admin  string
	// audit is the audit log's path when the configuration sets one (audit.path).
	audit string
}

type route struct {
	listen, peer, peerID string
	targetPort           int
	transport            string // "" for the default (tls)
}

type service struct {
	port  int
	allow []string
}

// startProxy enrols a proxy for spiffe://example.org/host/<name> and waits until it holds
// an SVID.
func startProxy(t *testing.T, ca *meshCA, name string, routes []route, services []service, extra string) *meshProxy {
	t.Helper()
	return startProxyOn(t, host{}, ca, name, fmt.Sprintf("127.0.0.1:%d", freePort(t)), fmt.Sprintf("127.0.0.1:%d", freePort(t)), routes, services, extra)
}

// startProxyOn is startProxy on h with the given tunnel and admin addresses.
func startProxyOn(t *testing.T, h host, ca *meshCA, name, tunnel, admin string, routes []route, services []service, extra string) *meshProxy {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	px := &meshProxy{
		id:     "spiffe://" + trustDomain + "/host/" + name,
		dir:    dir,
		tunnel: tunnel,
		admin:  admin,
	}
	ca.token(t, px.id, filepath.Join(dir, "token"))
	var b strings.Builder
	fmt.Fprintf(&b, "id: %s\nstate: %s\ntunnel: %s\nadmin: %s\n", px.id, dir, px.tunnel, px.admin)
	fmt.Fprintf(&b, "ca:\n  url: %s\n  root: %s\n  token_file: token\n", ca.url, ca.root)
	fmt.Fprintf(&b, "log:\n  level: debug\n")
	// The tests' clients (curl, the test process) are no registered agents: they travel
	// with the host identity unless a test asks for the refusing default.
	if !strings.Contains(extra, "unattested:") {
		b.WriteString("unattested: host\n")
	}
	b.WriteString(extra)
	if len(routes) > 0 {
		b.WriteString("routes:\n")
		for _, r := range routes {
			fmt.Fprintf(&b, "  - listen: %s\n    peer: %s\n    peer_id: %s\n    target_port: %d\n", r.listen, r.peer, r.peerID, r.targetPort)
			if r.transport != "" {
				fmt.Fprintf(&b, "    transport: %s\n", r.transport)
			}
		}
	}
	if len(services) > 0 {
		b.WriteString("services:\n")
		for _, s := range services {
			fmt.Fprintf(&b, "  - port: %d\n    allow: [%s]\n", s.port, strings.Join(s.allow, ", "))
		}
	}
	if _, rest, ok := strings.Cut(extra, "audit:\n  path: "); ok {
		px.audit, _, _ = strings.Cut(rest, "\n")
	}
	cfg := filepath.Join(dir, "proxy.yaml")
	writeFile(t, cfg, b.String())
	px.process = startCmd(t, name, h.command(binary, "proxy", "--config", cfg))
	awaitRotated(t, px, px.id, "enroll", time.Time{}, 60*time.Second)
	return px
}

func (p *meshProxy) auditPath() string {
	if p.audit != "" {
		return p.audit
	}
	return filepath.Join(p.dir, "audit.log")
}

// listenerPort starts a TCP listener on loopback and returns it with its port.
func listenerPort(t *testing.T) (net.Listener, int) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln, ln.Addr().(*net.TCPAddr).Port
}

// serveHTTP serves h over HTTP on a loopback port until the test ends and returns the
// port.
func serveHTTP(t *testing.T, h http.HandlerFunc) int {
	t.Helper()
	ln, port := listenerPort(t)
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	return port
}

func itoa(n int) string { return strconv.Itoa(n) }
