package e2e

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestRestartRejoins kills a proxy with SIGKILL and starts it again with the same
// configuration, whose bootstrap token was used at its first enrolment. With the default
// key store its host key lives in the SoftHSM token of its state directory and its
// certificate chain in the state directory, so it is ready again without a new token:
// it presents the stored SVID at once and renews it over mTLS (the rotation record
// names the serial it renewed from, and the host never enrols a second time), carries
// traffic, and the agent registered to it gets its identity back through the host's.
// The keys the killed process left in the token that no stored SVID names (the agent's)
// are destroyed at start, each with a key_state record (cause orphan).
// A proxy restarted after its SVID expired is not ready and says a new token is
// needed, until one is written to its token file.
func TestRestartRejoins(t *testing.T) {
	requireE2E(t)
	t.Run("valid", restartValid)
	t.Run("expired", restartExpired)
}

func restartValid(t *testing.T) {
	authority := startCA(t, 2*time.Minute)
	idA := "spiffe://" + trustDomain + "/host/a"
	agent := "spiffe://" + trustDomain + "/agent/restart"
	if out, errOut, err := runCmd(t.Context(), "register", agent, "--host", idA, "--uid", "4242",
		"--state", authority.state); err != nil {
		t.Fatalf("register %s: %v\n%s%s", agent, err, out, errOut)
	}
	httpPort := serveHello(t)
	b := startProxy(t, authority, "b", nil, []service{{port: httpPort, allow: []string{idA}}}, "")
	routeAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	a := startProxy(t, authority, "a", []route{{listen: routeAddr, peer: b.tunnel, peerID: b.id, targetPort: httpPort}}, nil, "")

	hostEnrol := map[string]string{"type": "rotation", "spiffe_id": idA, "trigger": "enroll", "result": "ok"}
	agentEnrol := map[string]string{"type": "rotation", "spiffe_id": agent, "trigger": "enroll", "result": "ok"}
	enrolled := awaitRecord(t, a, hostEnrol, 10*time.Second)
	awaitRecord(t, a, agentEnrol, time.Minute)
	awaitIdentities(t, a, time.Minute)
	// No keep-alive: each request is a new connection, and so a new connection record.
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	if err := get(t.Context(), hc, "http://"+routeAddr+"/before"); err != nil {
		t.Fatalf("request before the restart: %v", err)
	}
	stored := fmt.Sprint(enrolled["new_serial"])
	// The keys in the token when the process dies: the stored host SVID's, which the
	// restart keeps, and the agent's (and any in overlap), which no one uses again.
	storedKey := awaitStored(t, a, stored)
	left := slices.DeleteFunc(tokenKeys(t, a), func(l string) bool { return l == storedKey })
	if len(left) == 0 {
		t.Fatalf("no key but the host's %s in the token before the kill: the agent's is missing", storedKey)
	}

	a = killAndRestart(t, a)
	restarted := time.Now()
	readyAfter := awaitReady(t, a, time.Minute)
	// /readyz counts every identity the proxy holds: once it is 200, the agent's is ready
	// too, with no further wait.
	if ids, err := proxyStatus(t.Context(), a); err != nil || !ids[agent].Ready {
		t.Errorf("/readyz 200 after the restart while the agent's identity is not ready: %+v (%v)", ids[agent], err)
	}
	// Destroyed at start, each audited; the stored key stays.
	for _, l := range left {
		awaitRecord(t, a, map[string]string{"type": "key_state", "label": l, "to": "destroyed", "cause": "orphan"}, 10*time.Second)
	}
	if now := tokenKeys(t, a); !slices.Contains(now, storedKey) || slices.ContainsFunc(left, func(l string) bool { return slices.Contains(now, l) }) {
		t.Errorf("keys in the token after the restart: %v, want %s kept and none of the orphans %v", now, storedKey, left)
	}
	renewal := awaitRecord(t, a, map[string]string{"type": "rotation", "spiffe_id": idA, "trigger": "restart",
		"old_serial": stored, "result": "ok"}, time.Minute)
	renewed := fmt.Sprint(renewal["new_serial"])
	renewedAfter := recordTime(t, renewal).Sub(restarted)
	if n := countRecords(t, a, hostEnrol); n != 1 {
		t.Errorf("the host enrolled %d times, want once: a restart renews the stored SVID", n)
	}
	wantRecord(t, a, map[string]string{"type": "key_state", "spiffe_id": idA, "serial": stored, "to": "active", "cause": "restored"})

	// The agent's identity comes back through the host's: a second enrolment.
	waitFor(t, time.Minute, "the agent enrolling again after the restart", func() error {
		if n := countRecords(t, a, agentEnrol); n < 2 {
			return fmt.Errorf("%d enrolments of %s", n, agent)
		}
		return nil
	})
	st := awaitIdentities(t, a, time.Minute)
	if host := st[idA]; host.Current == nil || host.Current.Serial != renewed {
		t.Errorf("status after the restart: host identity %+v, want current serial %s", host, renewed)
	}

	if err := get(t.Context(), hc, "http://"+routeAddr+"/after"); err != nil {
		t.Fatalf("request after the restart: %v", err)
	}
	awaitRecord(t, a, map[string]string{"type": "connection", "direction": "outbound", "local_serial": renewed}, 10*time.Second)
	awaitRecord(t, b, map[string]string{"type": "handshake", "direction": "inbound", "result": "ok", "peer_id": idA,
		"peer_serial": renewed}, 10*time.Second)
	fmt.Printf("restart: ready_after_ms=%d renewed_after_ms=%d\n", readyAfter.Milliseconds(), renewedAfter.Milliseconds())
}

func restartExpired(t *testing.T) {
	const lifetime = 12 * time.Second // the CA's minimum is 10 s
	authority := startCA(t, lifetime)
	// Retries come quickly once the new token is written.
	c := startProxy(t, authority, "c", nil, nil, "rotation:\n  retry_max: 2s\n")
	enrolled := awaitRecord(t, c, map[string]string{"type": "rotation", "spiffe_id": c.id, "trigger": "enroll", "result": "ok"}, 10*time.Second)
	stored := fmt.Sprint(enrolled["new_serial"])
	awaitStored(t, c, stored)
	if err := c.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-c.done
	// Down past the SVID's expiry: renewal is impossible, re-enrolment needs a new token.
	awaitStoredExpired(t, c, authority.root, lifetime+30*time.Second)
	c = restart(t, c)

	refused := awaitRecord(t, c, map[string]string{"type": "rotation", "spiffe_id": c.id, "trigger": "expired",
		"old_serial": stored, "result": "error"}, time.Minute)
	if reason := fmt.Sprint(refused["reason"]); !strings.Contains(reason, "new bootstrap token") {
		t.Errorf("refused re-enrolment recorded with reason %q, want it to say a new bootstrap token is needed", reason)
	}
	st := awaitStatus(t, c, time.Minute, func(ids map[string]identityStatus) bool { return ids[c.id].NeedsToken })
	if host := st[c.id]; host.Ready || !strings.Contains(host.Error, "new bootstrap token") {
		t.Errorf("status of the expired identity: %+v, want not ready, saying a new bootstrap token is needed", host)
	}
	if code := readyz(t, c); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz answered %d with an expired SVID and a used token, want 503", code)
	}

	authority.token(t, c.id, filepath.Join(c.dir, "token"))
	awaitReady(t, c, time.Minute)
	awaitRecord(t, c, map[string]string{"type": "rotation", "spiffe_id": c.id, "trigger": "expired",
		"old_serial": stored, "result": "ok"}, 10*time.Second)
	awaitRecord(t, c, map[string]string{"type": "key_state", "spiffe_id": c.id, "serial": stored, "to": "destroyed"}, 10*time.Second)
}

// killAndRestart kills p with SIGKILL, so it leaves its state as a crash would, and
// starts it again with the same configuration file. The new process is stopped when
// the test ends.
func killAndRestart(t *testing.T, p *meshProxy) *meshProxy {
	t.Helper()
	if err := p.cmd.Process.Kill(); err != nil {
		t.Fatalf("kill %s: %v", p.name, err)
	}
	<-p.done
	return restart(t, p)
}

// restart starts the exited proxy p again with its configuration file.
func restart(t *testing.T, p *meshProxy) *meshProxy {
	t.Helper()
	next := *p
	next.process = startCmd(t, p.name+"-restarted", exec.Command(binary, "proxy", "--config", filepath.Join(p.dir, "proxy.yaml")))
	return &next
}

// awaitStored waits until p's state file holds the SVID serial (it is written just
// after the rotation is audited) and returns the label of its key.
func awaitStored(t *testing.T, p *meshProxy, serial string) string {
	t.Helper()
	var st struct {
		Serial string `json:"serial"`
		Key    string `json:"key"`
	}
	waitFor(t, 30*time.Second, fmt.Sprintf("%s: svid.json naming serial %s", p.name, serial), func() error {
		b, err := os.ReadFile(filepath.Join(p.dir, "svid.json"))
		if err == nil {
			err = json.Unmarshal(b, &st)
		}
		if err == nil && (st.Serial != serial || st.Key == "") {
			err = fmt.Errorf("it names %+v", st)
		}
		return err
	})
	return st.Key
}

// awaitStoredExpired waits until the SVID in p's state file no longer verifies against
// the CA's root because it has expired.
func awaitStoredExpired(t *testing.T, p *meshProxy, root string, timeout time.Duration) {
	t.Helper()
	var st struct {
		Chain [][]byte `json:"chain"`
	}
	if err := json.Unmarshal(readFile(t, filepath.Join(p.dir, "svid.json")), &st); err != nil || len(st.Chain) == 0 {
		t.Fatalf("%s: svid.json: %v (%d certificates)", p.name, err, len(st.Chain))
	}
	leaf, err := x509.ParseCertificate(st.Chain[0])
	if err != nil {
		t.Fatal(err)
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	if !roots.AppendCertsFromPEM(readFile(t, root)) {
		t.Fatalf("no certificate in %s", root)
	}
	for _, der := range st.Chain[1:] {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		inter.AddCert(c)
	}
	waitFor(t, timeout, p.name+": the stored SVID expired", func() error {
		_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
		var invalid x509.CertificateInvalidError
		if errors.As(err, &invalid) && invalid.Reason == x509.Expired {
			return nil
		}
		if err == nil {
			return errors.New("still verifies")
		}
		return fmt.Errorf("verify: %w", err)
	})
}

// readyz returns the status code of p's /readyz, or 0 when it does not answer.
func readyz(t *testing.T, p *meshProxy) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.admin+"/readyz", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// awaitReady waits until p's /readyz answers 200 and returns how long that took.
func awaitReady(t *testing.T, p *meshProxy, timeout time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	waitFor(t, timeout, p.name+": /readyz 200", func() error {
		if code := readyz(t, p); code != http.StatusOK {
			return fmt.Errorf("answered %d", code)
		}
		return nil
	})
	return time.Since(start)
}

// identityStatus is one identity of `agentmesh status --json`.
type identityStatus struct {
	SPIFFEID   string `json:"spiffe_id"`
	Ready      bool   `json:"ready"`
	Error      string `json:"error"`
	NeedsToken bool   `json:"needs_token"`
	Current    *struct {
		Serial string `json:"serial"`
	} `json:"current"`
}

// proxyStatus runs `agentmesh status --json` against p and returns its identities by
// SPIFFE ID.
func proxyStatus(ctx context.Context, p *meshProxy) (map[string]identityStatus, error) {
	var doc struct {
		Identities []identityStatus `json:"identities"`
	}
	if err := statusJSON(ctx, p, &doc); err != nil {
		return nil, err
	}
	ids := map[string]identityStatus{}
	for _, id := range doc.Identities {
		ids[id.SPIFFEID] = id
	}
	return ids, nil
}

// statusJSON decodes `agentmesh status --json` of p into doc.
func statusJSON(ctx context.Context, p *meshProxy, doc any) error {
	out, errOut, err := runCmd(ctx, "status", "--admin", p.admin, "--json")
	if err != nil {
		return fmt.Errorf("agentmesh status: %w: %s", err, strings.TrimSpace(errOut))
	}
	if err := json.Unmarshal([]byte(out), doc); err != nil {
		return fmt.Errorf("agentmesh status --json: %w", err)
	}
	return nil
}

// awaitStatus waits until `agentmesh status --json` of p shows identities for which
// cond holds, and returns them.
func awaitStatus(t *testing.T, p *meshProxy, timeout time.Duration, cond func(map[string]identityStatus) bool) map[string]identityStatus {
	t.Helper()
	var ids map[string]identityStatus
	waitFor(t, timeout, p.name+": status as awaited", func() error {
		var err error
		if ids, err = proxyStatus(t.Context(), p); err == nil && !cond(ids) {
			err = fmt.Errorf("%+v", ids)
		}
		return err
	})
	return ids
}

// awaitIdentities waits until p holds at least two identities (its host's and an
// agent's), every one ready, and returns them.
func awaitIdentities(t *testing.T, p *meshProxy, timeout time.Duration) map[string]identityStatus {
	t.Helper()
	return awaitStatus(t, p, timeout, func(ids map[string]identityStatus) bool {
		ready := len(ids) >= 2
		for _, id := range ids {
			ready = ready && id.Ready
		}
		return ready
	})
}

// countRecords counts the records of p's audit log with all the given fields.
func countRecords(t *testing.T, p *meshProxy, want map[string]string) int {
	t.Helper()
	n := 0
	for _, r := range readAudit(t, p.auditPath()) {
		if matches(r, want) {
			n++
		}
	}
	return n
}
