package e2e

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	cdplog "github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/softhsmtest"
	"github.com/agentmesh/agentmesh/meshapi"
)

// screenshotPath is the README's picture of the status page. The test writes it when
// it is missing or AGENTMESH_SCREENSHOT is set, so that make test leaves the tree as
// it found it.
const screenshotPath = "../docs/img/status.png"

// TestStatusPage opens the CA's status page in a headless chromium, on the loopback
// listener an operator reaches through ssh -L, with a CA and three proxies (one of them
// holding an agent's identity): the page lists the proxies, every identity with its
// current serial and every witnessed audit log; a rotation on a proxy moves its
// previous key to overlap on the timeline; an `agentmesh revoke` shows in the
// revocations within 2 s, without a reload. Over the CA's HTTPS port the page is for
// admin SVIDs only: a proxy's SVID and a client without a certificate get 403, each
// refusal audited and counted, the admin SVID gets the page.
func TestStatusPage(t *testing.T) {
	requireE2E(t)
	// Skipped on a developer's machine without it, failed on CI: make deps installs it.
	chromium := softhsmtest.RequireTool(t, "chromium")
	m := startStatusMesh(t)
	p := openPage(t, chromium, "http://"+m.statusAddr+"/status/")
	m.checkListed(t, p)
	// A reload would lose this mark: the page must update in place.
	evaluate[bool](p, "mark the window", `window.agentmeshLoaded = true`)
	m.checkRotation(t, p, m.proxies[1])
	m.checkRevocation(t, p)
	m.checkAccess(t, m.proxies[0])
	p.screenshot(screenshotPath)
	p.checkClean()
}

// statusMesh is a CA serving its status page and the proxies it shows.
type statusMesh struct {
	authority *meshCA
	proxies   []*meshProxy
	// agent is an agent's identity that the last proxy holds.
	agent string
	// statusAddr is the page's loopback listener, metrics the CA's /metrics page.
	statusAddr, metrics string
	adminID             string
}

func startStatusMesh(t *testing.T) *statusMesh {
	t.Helper()
	m := &statusMesh{
		agent:      "spiffe://" + trustDomain + "/agent/planner",
		statusAddr: fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		metrics:    fmt.Sprintf("127.0.0.1:%d", freePort(t)),
		adminID:    "spiffe://" + trustDomain + "/admin/alice",
	}
	m.authority = startCAOn(t, host{}, fmt.Sprintf("127.0.0.1:%d", freePort(t)), 10*time.Minute,
		"--status-listen", m.statusAddr, "--admin-id", m.adminID, "--metrics", m.metrics,
		"--audit-checkpoint-interval", "1s")
	// Each proxy advertises an address of its own, which the CA learns (from loopback) at
	// its first heartbeat: a proxy that advertises none sends no heartbeat, so no status.
	for i, name := range []string{"a", "b", "c"} {
		m.proxies = append(m.proxies, startProxy(t, m.authority, name, nil, nil,
			fmt.Sprintf("directory:\n  advertise: [127.0.0.%d]\naudit:\n  checkpoint_interval: 1s\n", 11+i)))
	}
	c := m.proxies[2]
	if _, errOut, err := runCmd(t.Context(), "register", m.agent, "--host", c.id, "--uid", "4343",
		"--state", m.authority.state); err != nil {
		t.Fatalf("register %s: %v\n%s", m.agent, err, errOut)
	}
	awaitIdentities(t, c, time.Minute)
	return m
}

// checkListed waits until the page shows every proxy ready, every identity on its
// host with the serial the proxy last audited, and every audit log the CA witnesses
// (the first heartbeats and checkpoints may still be on their way).
func (m *statusMesh) checkListed(t *testing.T, p *page) {
	t.Helper()
	held := map[string]*meshProxy{m.agent: m.proxies[2]}
	origins := []string{meshapi.CAAuditOrigin(spiffeid.RequireTrustDomainFromString(trustDomain))}
	for _, px := range m.proxies {
		held[px.id] = px
		origins = append(origins, meshapi.AuditOrigin(spiffeid.RequireFromString(px.id)))
		p.waitPresent(px.name+" listed ready in #fleet", 30*time.Second,
			"#fleet tr"+attr("data-host", px.id)+attr("data-ready", "true"))
	}
	for id, px := range held {
		p.waitSerial(id, currentSerial(t, px, id), 30*time.Second)
	}
	for _, origin := range origins {
		p.waitPresent(origin+" witnessed in #witness", 30*time.Second,
			"#witness tr"+attr("data-origin", origin)+attr("data-state", "ok"))
	}
	if n := evaluate[int](p, "proxies in #fleet", `document.querySelectorAll("#fleet tr[data-host]").length`); n != len(m.proxies) {
		t.Errorf("#fleet lists %d proxies, want %d", n, len(m.proxies))
	}
}

// checkRotation rotates px's host identity: on the timeline its previous key turns to
// overlap beside the new active one, both drawn on the axis, and #identities shows the
// new serial.
func (m *statusMesh) checkRotation(t *testing.T, p *page, px *meshProxy) {
	t.Helper()
	keys := "#timeline div" + attr("data-id", px.id)
	active := keys + ` span[data-state="active"]`
	p.waitPresent(px.name+"'s active key on the timeline", 30*time.Second, active)
	before := evaluate[string](p, px.name+"'s active key version",
		fmt.Sprintf(`document.querySelector(%s).dataset.version`, strconv.Quote(active)))
	rotated := time.Now()
	if out, errOut, err := runCmd(t.Context(), "rotate", "--state", px.dir, "--reason", "e2e status page"); err != nil {
		t.Fatalf("agentmesh rotate: %v\n%s%s", err, out, errOut)
	}
	newSerial := fmt.Sprint(awaitRotated(t, px, px.id, "operator", rotated, 30*time.Second)["new_serial"])
	p.waitFor(px.name+"'s previous key in overlap on the timeline", 10*time.Second,
		`args.every((s) => document.querySelector(s)?.getBoundingClientRect().width > 0)`,
		keys+" span"+attr("data-version", before)+attr("data-state", "overlap"),
		active+":not("+attr("data-version", before)+")")
	p.waitSerial(px.id, newSerial, 10*time.Second)
}

// checkRevocation revokes the agent's identity: its row shows in #revocations within
// 2 s of the command's return, naming who and why, in place (no reload, a new
// generation).
func (m *statusMesh) checkRevocation(t *testing.T, p *page) {
	t.Helper()
	generation := evaluate[string](p, "the page's generation", `document.body.dataset.generation || ""`)
	start := time.Now()
	if _, errOut, err := runCmd(t.Context(), "revoke", "--state", m.authority.state, m.agent, "--reason", "e2e status page"); err != nil {
		t.Fatalf("agentmesh revoke: %v\n%s", err, errOut)
	}
	revoked := time.Now()
	row := "#revocations tr" + attr("data-id", m.agent)
	p.do("the revocation of "+m.agent+" in #revocations", 2*time.Second,
		chromedp.WaitVisible(chromedp.CSS(row), chromedp.RetryInterval(50*time.Millisecond)))
	// The CA has the revocation before the command returns, so the page may show it
	// sooner: both times are printed.
	fmt.Printf("status_page_revocation_command_ms=%d shown_after_return_ms=%d\n",
		revoked.Sub(start).Milliseconds(), time.Since(revoked).Milliseconds())
	if !evaluate[bool](p, "the window's mark", `window.agentmeshLoaded === true`) {
		t.Error("the page reloaded to show the revocation")
	}
	if g := evaluate[string](p, "the page's generation", `document.body.dataset.generation || ""`); g == "" || g == generation {
		t.Errorf("body data-generation %q after the revocation, was %q: want it bumped", g, generation)
	}
	text := evaluate[string](p, "the revocation's row", fmt.Sprintf(`document.querySelector(%s).innerText`, strconv.Quote(row)))
	for _, want := range []string{fmt.Sprintf("uid:%d", os.Getuid()), "e2e status page"} {
		if !strings.Contains(text, want) {
			t.Errorf("revocation row %q does not name %q", text, want)
		}
	}
}

// checkAccess: over the CA's HTTPS port, px's SVID (a valid one, not an admin's) and a
// client without a certificate get 403 on the page and its document, each refusal
// audited and counted; the admin SVID, enrolled with a token as any identity is, gets
// them.
func (m *statusMesh) checkAccess(t *testing.T, px *meshProxy) {
	t.Helper()
	authority := m.authority
	chain := presentedChain(t, px.tunnel)
	proxySVID := clientCert(chain, tokenKey(t, px.dir, chain[0]))
	admin := enrollAs(t, authority, m.adminID)
	roots := x509.NewCertPool()
	for _, r := range admin.roots {
		roots.AddCert(r)
	}

	for _, path := range []string{"/status/", "/status/api"} {
		if code, _, body := statusGet(t, authority.url+path, roots, &proxySVID); code != http.StatusForbidden {
			t.Errorf("%s with proxy %s's SVID: %d %.200s, want 403", path, px.name, code, body)
		}
		if code, _, body := statusGet(t, authority.url+path, roots, nil); code != http.StatusForbidden {
			t.Errorf("%s without a client certificate: %d %.200s, want 403", path, code, body)
		}
	}
	awaitRecordIn(t, "ca", authority.auditPath(), map[string]string{"type": "status_access", "result": "refused",
		"reason": "not_admin", "initiator": px.id, "caller_serial": chain[0].SerialNumber.String(), "path": "/status/"}, 10*time.Second)
	awaitRecordIn(t, "ca", authority.auditPath(), map[string]string{"type": "status_access", "result": "refused",
		"reason": "no_certificate", "initiator": "unauthenticated", "path": "/status/api"}, 10*time.Second)
	if n, err := scrapeMetric("http://"+m.metrics+"/metrics", "agentmesh_ca_status_refused_total"); err != nil || n < 4 {
		t.Errorf("agentmesh_ca_status_refused_total = %v (%v), want at least the 4 refusals", n, err)
	}

	adminSVID := clientCert(admin.svid.Certificates, admin.key)
	code, header, body := statusGet(t, authority.url+"/status/", roots, &adminSVID)
	if code != http.StatusOK || !strings.Contains(body, `data-host="`+px.id+`"`) {
		t.Fatalf("/status/ with the admin SVID: %d, want 200 listing %s:\n%.500s", code, px.id, body)
	}
	if csp := header.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'self'") {
		t.Errorf("Content-Security-Policy %q, want default-src 'self'", csp)
	}
	if code, _, body := statusGet(t, authority.url+"/status/api", roots, &adminSVID); code != http.StatusOK || !strings.Contains(body, `"generation"`) {
		t.Errorf("/status/api with the admin SVID: %d %.200s, want 200 with the document", code, body)
	}
}

// clientCert is a TLS client certificate of chain and its key.
func clientCert(chain []*x509.Certificate, key crypto.Signer) tls.Certificate {
	c := tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, x := range chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return c
}

// statusGet GETs url over HTTPS trusting roots, presenting cert unless nil, and
// returns the status, headers and body.
func statusGet(t *testing.T, url string, roots *x509.CertPool, cert *tls.Certificate) (int, http.Header, string) {
	t.Helper()
	cfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, resp.Header, string(body)
}

// attr is a CSS attribute selector [name="value"].
func attr(name, value string) string { return "[" + name + "=" + strconv.Quote(value) + "]" }

// page is one tab of a headless chromium, open for the rest of the test. It keeps what
// the page's scripts threw or logged as errors and what the browser refused them
// (Content-Security-Policy), which the test reports at its end.
type page struct {
	t   *testing.T
	ctx context.Context // the tab's: every action runs under a child with a deadline

	mu       sync.Mutex
	problems []string
}

// openPage starts chromium (its own profile, removed when the test ends) and loads url.
func openPage(t *testing.T, chromium, url string) *page {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium), chromedp.WindowSize(1280, 900))
	if os.Geteuid() == 0 {
		// Chromium refuses to start its sandbox as root; the page is the test's own.
		opts = append(opts, chromedp.NoSandbox)
	}
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(t.Context(), opts...)
	p := &page{t: t}
	var cancelTab context.CancelFunc
	p.ctx, cancelTab = chromedp.NewContext(allocCtx, chromedp.WithListener(p.record))
	t.Cleanup(func() {
		cancelTab()
		cancelAlloc()
	})
	// The first action starts the browser under the tab's own context, since a deadline
	// on it would end the browser too; it is bounded by chromedp's wait for the browser.
	if err := chromedp.Do(p.ctx, chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
		_, err := cdp.Call(ctx, tg, cdplog.Enable, cdp.Empty{}) // CSP violations come as log entries
		return err
	})); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	p.do("load "+url, 30*time.Second, chromedp.Navigate(url))
	return p
}

// record keeps the events that show a broken page. It runs on chromedp's reading
// goroutine: it only appends.
func (p *page) record(ev any) {
	var problem string
	switch ev := ev.(type) {
	case *runtime.EventExceptionThrown:
		problem = "exception: " + (&chromedp.ExceptionError{ExceptionDetails: ev.ExceptionDetails}).Error()
	case *runtime.EventConsoleAPICalled:
		if ev.Type == runtime.ConsoleAPICalledTypeError {
			var args []string
			for _, a := range ev.Args {
				args = append(args, string(a.Value))
			}
			problem = "console.error: " + strings.Join(args, " ")
		}
	case *cdplog.EventEntryAdded:
		// Network errors (a favicon the page does not have) are no fault of the page.
		if ev.Entry.Level == cdplog.EntryLevelError && ev.Entry.Source != cdplog.EntrySourceNetwork {
			problem = fmt.Sprintf("%s: %s", ev.Entry.Source, ev.Entry.Text)
		}
	}
	if problem != "" {
		p.mu.Lock()
		p.problems = append(p.problems, problem)
		p.mu.Unlock()
	}
}

// checkClean fails the test with what the page threw, logged as errors or had refused.
func (p *page) checkClean() {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, problem := range p.problems {
		p.t.Errorf("status page: %s", problem)
	}
}

// do runs actions on the page within timeout, or fails the test showing the page.
func (p *page) do(what string, timeout time.Duration, actions ...chromedp.Action[chromedp.Void]) {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, timeout)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		p.t.Fatalf("status page: %s: not within %v: %v\npage text:\n%s", what, timeout, err, p.text())
	}
}

// waitFor waits until the JavaScript expression predicate, with the strings args as
// args, is true: checked at once and at every change of the page's DOM, so with no
// polling of its own.
func (p *page) waitFor(what string, timeout time.Duration, predicate string, args ...string) {
	p.t.Helper()
	fnArgs := make([]any, len(args))
	for i, a := range args {
		fnArgs[i] = a
	}
	p.do(what, timeout, chromedp.PollFunction[chromedp.Void]("(...args) => "+predicate,
		chromedp.WithPollingMutation(), chromedp.WithPollingTimeout(timeout), chromedp.WithPollingArgs(fnArgs...)))
}

// waitPresent waits until an element matches the CSS selector sel.
func (p *page) waitPresent(what string, timeout time.Duration, sel string) {
	p.t.Helper()
	p.waitFor(what, timeout, `document.querySelector(args[0]) !== null`, sel)
}

// waitSerial waits until #identities shows id with the current serial serial.
func (p *page) waitSerial(id, serial string, timeout time.Duration) {
	p.t.Helper()
	p.waitPresent(fmt.Sprintf("%s with serial %s in #identities", id, serial), timeout,
		"#identities tr"+attr("data-id", id)+attr("data-serial", serial))
}

// text is the page's visible text, to show when a wait fails.
func (p *page) text() string {
	ctx, cancel := context.WithTimeout(p.ctx, 5*time.Second)
	defer cancel()
	s, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.body ? document.body.innerText : ""`))
	if err != nil {
		return fmt.Sprintf("(unreadable: %v)", err)
	}
	return s
}

// evaluate returns the value of the JavaScript expression expr on the page.
func evaluate[T any](p *page, what, expr string) T {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(p.ctx, 5*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr))
	if err != nil {
		p.t.Fatalf("status page: %s: %v", what, err)
	}
	return v
}

// screenshot saves the whole page as a PNG at path when the file is missing or
// AGENTMESH_SCREENSHOT is set.
func (p *page) screenshot(path string) {
	p.t.Helper()
	if _, err := os.Stat(path); err == nil && os.Getenv("AGENTMESH_SCREENSHOT") == "" {
		return
	}
	ctx, cancel := context.WithTimeout(p.ctx, 30*time.Second)
	defer cancel()
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		p.t.Fatalf("screenshot: %v", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		p.t.Fatal(err)
	}
	if err := os.WriteFile(path, png, 0o644); err != nil { //nolint:gosec // a picture for the README
		p.t.Fatal(err)
	}
	p.t.Logf("status page screenshot: %s (%d bytes)", path, len(png))
}
