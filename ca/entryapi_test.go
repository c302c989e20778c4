package ca

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testaudit"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"
)

// refusedAdminRecord audits refused writes of entries and revocations and refused
// tokens, not reads.
func TestRefusedAdminRecord(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		method, target string
		want           audit.Event
	}{
		{http.MethodPost, adminEntriesPath, audit.Registration{Actor: audit.Actor{Initiator: "uid:7"}, Action: "register", Result: "refused", Error: "no"}},
		{http.MethodDelete, adminEntriesPath + "?id=spiffe://mesh.test/agent/x", audit.Registration{Actor: audit.Actor{Initiator: "uid:7"}, Action: "unregister",
			SPIFFEID: "spiffe://mesh.test/agent/x", Result: "refused", Error: "no"}},
		{http.MethodPost, adminRevokePath, audit.Revocation{Actor: audit.Actor{Initiator: "uid:7"}, Result: "refused", Error: "no"}},
		{http.MethodGet, adminEntriesPath, nil},
		{http.MethodPost, adminTokenPath, audit.Issuance{Action: audit.ActionToken, Actor: audit.Actor{Initiator: "uid:7"}, Result: audit.IssueRefused,
			Reason: audit.ReasonNotAllowed, Error: "no"}},
	} {
		got := refusedAdminRecord(httptest.NewRequest(tc.method, tc.target, nil), audit.Actor{Initiator: "uid:7"}, "no")
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s %s: %+v, want %+v", tc.method, tc.target, got, tc.want)
		}
	}
}

// Registering, listing and unregistering through the admin socket: the conflict
// rules with the CA's message, refusals, the directory document and its version, and
// an audit record for each change, done or refused.
func TestEntriesAdminSocket(t *testing.T) {
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	cfg.Audit = rec
	startCA(t, cfg)
	ctx := context.Background()

	before, err := RequestDirectory(ctx, cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	x := meshapi.Entry{ID: agentX, Host: idA, UID: 1000, Port: 8080}
	y := meshapi.Entry{ID: agentY, Host: idA, UID: 0} // root's processes: uid 0 must reach the CA
	for _, e := range []meshapi.Entry{y, x} {
		if err := RegisterEntry(ctx, cfg.StateDir, e); err != nil {
			t.Fatalf("RegisterEntry(%+v): %v", e, err)
		}
	}
	got, err := ListEntries(ctx, cfg.StateDir)
	if err != nil || !slices.Equal(got, []meshapi.Entry{x, y}) {
		t.Fatalf("ListEntries = %+v, %v; want x, y", got, err)
	}
	doc, err := RequestDirectory(ctx, cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(doc.Entries, []meshapi.Entry{x, y}) || doc.Version < before.Version+2 {
		t.Errorf("directory: version %d (was %d), entries %+v", doc.Version, before.Version, doc.Entries)
	}

	for _, tc := range []struct {
		name    string
		e       meshapi.Entry
		status  int
		message string
	}{
		{"same id", meshapi.Entry{ID: agentX, Host: idB, UID: 1}, http.StatusConflict, "spiffe://mesh.test/agent/x is already registered to spiffe://mesh.test/host/a"},
		{"same uid", meshapi.Entry{ID: agentZ, Host: idA, UID: 1000}, http.StatusConflict, "uid 1000 on spiffe://mesh.test/host/a is already registered to spiffe://mesh.test/agent/x"},
		{"same port", meshapi.Entry{ID: agentZ, Host: idA, UID: 1002, Port: 8080}, http.StatusConflict, "port 8080 on spiffe://mesh.test/host/a is already registered to spiffe://mesh.test/agent/x"},
		{"not an agent", meshapi.Entry{ID: spiffeid.RequireFromPath(testTD, "/workload/z"), Host: idA, UID: 1002}, http.StatusBadRequest, "is not spiffe://mesh.test/agent/NAME"},
		{"foreign host", meshapi.Entry{ID: agentZ, Host: spiffeid.RequireFromPath(spiffeid.RequireTrustDomainFromString("o.test"), "/host/a"), UID: 1002}, http.StatusBadRequest, "is not spiffe://mesh.test/host/NAME"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := RegisterEntry(ctx, cfg.StateDir, tc.e)
			if responseStatus(err) != tc.status || !strings.Contains(err.Error(), tc.message) {
				t.Errorf("RegisterEntry(%+v) = %v, want %d with %q", tc.e, err, tc.status, tc.message)
			}
		})
	}
	t.Run("uid missing from the body", func(t *testing.T) {
		_, err := adminRequest(ctx, cfg.StateDir, "register entry", http.MethodPost, adminEntriesPath,
			[]byte(`{"id":"spiffe://mesh.test/agent/z","host":"spiffe://mesh.test/host/a"}`), adminMaxBody)
		if responseStatus(err) != http.StatusBadRequest {
			t.Errorf("register without uid: %v, want 400", err)
		}
	})
	t.Run("unknown id", func(t *testing.T) {
		if err := UnregisterEntry(ctx, cfg.StateDir, agentZ); responseStatus(err) != http.StatusNotFound {
			t.Errorf("UnregisterEntry of an unknown id: %v, want 404", err)
		}
	})
	if got, _ := ListEntries(ctx, cfg.StateDir); !slices.Equal(got, []meshapi.Entry{x, y}) {
		t.Fatalf("refusals changed the entries: %+v", got)
	}

	if err := UnregisterEntry(ctx, cfg.StateDir, agentX); err != nil {
		t.Fatalf("UnregisterEntry: %v", err)
	}
	after, err := RequestDirectory(ctx, cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(after.Entries, []meshapi.Entry{y}) || after.Version <= doc.Version {
		t.Errorf("directory after unregister: version %d (was %d), entries %+v", after.Version, doc.Version, after.Entries)
	}
	// Its uid and port are free again.
	if err := RegisterEntry(ctx, cfg.StateDir, meshapi.Entry{ID: agentZ, Host: idA, UID: 1000, Port: 8080}); err != nil {
		t.Errorf("register on the freed uid and port: %v", err)
	}

	initiator := "uid:" + strconv.Itoa(os.Getuid())
	recs := registrations(rec)
	var results []string
	for _, r := range recs {
		if r.Initiator != initiator {
			t.Errorf("initiator %q, want %q", r.Initiator, initiator)
		}
		results = append(results, r.Action+" "+r.Result)
	}
	want := []string{"register ok", "register ok", "register refused", "register refused", "register refused",
		"register refused", "register refused", "register refused", "unregister refused", "unregister ok", "register ok"}
	if !slices.Equal(results, want) {
		t.Fatalf("audit records %v, want %v", results, want)
	}
	if r := recs[1]; r.SPIFFEID != x.ID.String() || r.Host != x.Host.String() || r.UID == nil || *r.UID != 1000 || r.Port != 8080 || r.Error != "" {
		t.Errorf("register record %+v", r)
	}
	if r := recs[2]; !strings.Contains(r.Error, "already registered") || r.SPIFFEID != agentX.String() {
		t.Errorf("conflict record %+v", r)
	}
	if r := recs[9]; r.SPIFFEID != x.ID.String() || r.Host != x.Host.String() || r.UID == nil || *r.UID != 1000 || r.Port != 8080 {
		t.Errorf("unregister record %+v", r)
	}
	if r := recs[8]; r.SPIFFEID != agentZ.String() || r.UID != nil || r.Error == "" {
		t.Errorf("refused unregister record %+v", r)
	}
}

// openAuditLog is a real audit log in a file, written while the test runs.
func openAuditLog(t *testing.T) (*audit.Log, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	return testaudit.Start(t, path), path
}

// auditLines syncs l and returns the records of its file of the given type.
func auditLines(t *testing.T, l *audit.Log, path, kind string) []map[string]any {
	t.Helper()
	if err := l.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }() // read only
	var out []map[string]any
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("audit line %q: %v", sc.Text(), err)
		}
		if m["type"] == kind {
			out = append(out, m)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// agentDirectory is a Directory presenting svid that only watches (no addresses):
// enough to ask for agent tokens.
func agentDirectory(t *testing.T, ca *runningCA, svid *x509svid.SVID) *meshclient.Member {
	t.Helper()
	cert := tlsCert(svid)
	d, err := meshclient.NewMember(meshclient.Config{URL: ca.URL(), Roots: ca.Roots(),
		Certificate: func() (*tls.Certificate, error) { return cert, nil }})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// The agent token on the mesh API goes to the proxy of the entry's host only; the
// token enrols the agent; other callers get 403 and an audit record in the log file;
// after unregistering, the agent SVID is not renewed and no token is granted.
func TestAgentToken(t *testing.T) {
	cfg, _ := testConfig(t)
	log, logPath := openAuditLog(t)
	cfg.Audit = log
	ca := startCA(t, cfg)
	ctx := context.Background()

	hostA := agentDirectory(t, ca, enroll(t, ca, idA))
	hostB := agentDirectory(t, ca, enroll(t, ca, idB))
	if err := ca.RegisterEntry(ctx, audit.Actor{Initiator: "op"}, meshapi.Entry{ID: agentX, Host: idA, UID: 1000, Port: 8080}); err != nil {
		t.Fatal(err)
	}

	tok, err := hostA.Tokens.AgentToken(ctx, agentX)
	if err != nil {
		t.Fatalf("AgentToken by the entry's host: %v", err)
	}
	key := newKey(t)
	client := newClient(t, ca, fixedToken(tok))
	chain, err := client.Enroll(ctx, agentX, key)
	if err != nil {
		t.Fatalf("Enroll with the agent token: %v", err)
	}
	agent := &x509svid.SVID{ID: agentX, Certificates: chain, PrivateKey: key}
	if id, err := x509svid.IDFromCert(chain[0]); err != nil || id != agentX {
		t.Fatalf("agent SVID for %v (%v)", id, err)
	}
	// Agents re-enrol through their host: their certificates never renew themselves.
	if _, err := client.Renew(ctx, agent, newKey(t)); responseStatus(err) != http.StatusForbidden || !permanent(err) {
		t.Fatalf("Renew of a registered agent: %v, want a permanent 403", err)
	}

	for _, tc := range []struct {
		name    string
		d       *meshclient.Member
		id      spiffeid.ID
		message string
	}{
		{"another host", hostB, agentX, "spiffe://mesh.test/agent/x is registered to spiffe://mesh.test/host/a, not spiffe://mesh.test/host/b"},
		{"no entry", hostA, agentY, "no registration entry for spiffe://mesh.test/agent/y"},
		{"an agent asking", agentDirectory(t, ca, agent), agentX, "only /host/* identities"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.d.Tokens.AgentToken(ctx, tc.id)
			if responseStatus(err) != http.StatusForbidden || !strings.Contains(err.Error(), tc.message) || !permanent(err) {
				t.Errorf("AgentToken = %v, want a permanent 403 with %q", err, tc.message)
			}
		})
	}

	recs := auditLines(t, log, logPath, "issuance")
	var granted, refusedB bool
	for _, r := range recs {
		if r["action"] != "token" {
			continue
		}
		switch {
		case r["result"] == "ok" && r["initiator"] == idA.String() && r["spiffe_id"] == agentX.String() && r["host"] == idA.String():
			granted = true
		case r["result"] == "refused" && r["initiator"] == idB.String() && r["spiffe_id"] == agentX.String() &&
			r["host"] == idA.String() && strings.Contains(fmt.Sprint(r["error"]), "registered to"):
			refusedB = true
		}
	}
	if !granted || !refusedB {
		t.Errorf("audit log: granted record %v, refused record for host b %v; records %v", granted, refusedB, recs)
	}

	if _, err := ca.UnregisterEntry(ctx, audit.Actor{Initiator: "op"}, agentX); err != nil {
		t.Fatal(err)
	}
	_, err = newClient(t, ca, nil).Renew(ctx, agent, newKey(t))
	if responseStatus(err) != http.StatusForbidden || !permanent(err) {
		t.Errorf("Renew after unregister: %v, want a permanent 403", err)
	}
	if _, err := hostA.Tokens.AgentToken(ctx, agentX); responseStatus(err) != http.StatusForbidden {
		t.Errorf("AgentToken after unregister: %v, want 403", err)
	}
	// Host SVIDs and other workloads are not subject to entries.
	if _, err := newClient(t, ca, nil).Renew(ctx, enroll(t, ca, idB), newKey(t)); err != nil {
		t.Errorf("Renew of a host SVID: %v", err)
	}
}

// childStateEnv carries the state directory to TestEntriesAdminChild, run as another
// user by TestEntriesRefuseOtherUsers.
const childStateEnv = "AGENTMESH_TEST_ENTRIES_STATE"

// A caller that is neither root nor the CA's user is refused every entry request by
// its peer uid, and the refused changes are audited with that uid. The child runs as
// nobody (65534); the state directory and the socket are opened up for it, so that
// the peer-uid check, not the file mode, is what refuses it.
func TestEntriesRefuseOtherUsers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a process as another user")
	}
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	cfg.Audit = rec
	startCA(t, cfg)
	for dir := cfg.StateDir; strings.HasPrefix(dir, os.TempDir()+"/"); dir = filepath.Dir(dir) {
		if err := os.Chmod(dir, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(filepath.Join(cfg.StateDir, fileAdminSocket), 0o666); err != nil {
		t.Fatal(err)
	}
	// The test binary's own directory is private to root: run a copy.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "ca.test")
	if err := os.Chmod(filepath.Dir(bin), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-test.run=^TestEntriesAdminChild$", "-test.v")
	cmd.Env = append(os.Environ(), childStateEnv+"="+cfg.StateDir)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestEntriesAdminChild") {
		t.Fatalf("child: %v\n%s", err, out)
	}

	got := registrations(rec)
	var summary []string
	for _, r := range got {
		if r.Error == "" {
			t.Errorf("refusal without a reason: %+v", r)
		}
		summary = append(summary, strings.Join([]string{r.Initiator, r.Action, r.SPIFFEID, r.Result}, " "))
	}
	if want := []string{"uid:65534 register  refused", "uid:65534 unregister " + agentX.String() + " refused"}; !slices.Equal(summary, want) {
		t.Errorf("audit records %q, want %q", summary, want)
	}
	if entries, err := ListEntries(context.Background(), cfg.StateDir); err != nil || len(entries) != 0 {
		t.Errorf("entries after the refusals: %+v, %v", entries, err)
	}
}

// TestEntriesAdminChild is the other user's side of TestEntriesRefuseOtherUsers.
func TestEntriesAdminChild(t *testing.T) {
	dir := os.Getenv(childStateEnv)
	if dir == "" {
		t.Skip("run by TestEntriesRefuseOtherUsers as another user")
	}
	ctx := context.Background()
	if err := RegisterEntry(ctx, dir, meshapi.Entry{ID: agentX, Host: idA, UID: uint32(os.Getuid())}); responseStatus(err) != http.StatusForbidden {
		t.Errorf("RegisterEntry: %v, want 403", err)
	}
	if err := UnregisterEntry(ctx, dir, agentX); responseStatus(err) != http.StatusForbidden {
		t.Errorf("UnregisterEntry: %v, want 403", err)
	}
	if _, err := ListEntries(ctx, dir); responseStatus(err) != http.StatusForbidden {
		t.Errorf("ListEntries: %v, want 403", err)
	}
}
