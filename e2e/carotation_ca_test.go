package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/ca/authority"
	"github.com/agentmesh/agentmesh/hsm"
	"github.com/agentmesh/agentmesh/internal/unixhttp"
	"github.com/agentmesh/agentmesh/meshapi"
)

// rotationPhases are the phases of a rotation that completes, in order.
var rotationPhases = []meshapi.AnchorPhase{meshapi.PhasePrepare, meshapi.PhaseDistribute, meshapi.PhaseActivate,
	meshapi.PhaseRetire, meshapi.PhaseDestroy, meshapi.PhaseDone}

// reached reports whether phase is p or a later phase of a rotation that completes.
func reached(phase, p meshapi.AnchorPhase) bool {
	i := slices.Index(rotationPhases, phase)
	return i >= 0 && i >= slices.Index(rotationPhases, p)
}

// rotationStatus asks the CA's admin socket for what `agentmesh ca rotation status
// --json` prints. The waits poll it there, without starting a process per poll; the
// command's own output is checked where a rotation ends.
func (c *meshCA) rotationStatus(ctx context.Context) (meshapi.RotationStatus, error) {
	var st meshapi.RotationStatus
	code, body, err := unixhttp.Do(ctx, unixhttp.Request{Socket: filepath.Join(c.state, "admin.sock"),
		Method: http.MethodGet, Path: meshapi.AdminRotationPath, Limit: 1 << 20, Timeout: 5 * time.Second})
	if err == nil && code != http.StatusOK {
		err = fmt.Errorf("GET %s: %d %s", meshapi.AdminRotationPath, code, strings.TrimSpace(string(body)))
	}
	if err == nil {
		err = json.Unmarshal(body, &st)
	}
	return st, err
}

// rotationCLI runs `agentmesh ca rotation ARGS --state STATE` and returns its output.
func (c *meshCA) rotationCLI(t *testing.T, args ...string) string {
	t.Helper()
	args = append(append([]string{"ca", "rotation"}, args...), "--state", c.state)
	out, errOut, err := runCmd(t.Context(), args...)
	if err != nil {
		t.Fatalf("agentmesh %s: %v\n%s%s", strings.Join(args, " "), err, out, errOut)
	}
	return out
}

// statusJSON is `agentmesh ca rotation status --json`.
func (c *meshCA) statusJSON(t *testing.T) meshapi.RotationStatus {
	t.Helper()
	var st meshapi.RotationStatus
	if out := c.rotationCLI(t, "status", "--json"); json.Unmarshal([]byte(out), &st) != nil {
		t.Fatalf("agentmesh ca rotation status --json printed %q", out)
	}
	return st
}

// rotateArgs are the arguments of `agentmesh ca rotate kind` with the test's renew
// window and extra.
func (c *meshCA) rotateArgs(kind meshapi.AnchorKind, extra ...string) []string {
	return append([]string{"ca", "rotate", string(kind), "--state", c.state,
		"--renew-window", rotationRenewWindow.String(), "--reason", "e2e " + string(kind)}, extra...)
}

// rotate runs `agentmesh ca rotate kind` and returns the ID of the rotation it
// started, from the status.
func (c *meshCA) rotate(t *testing.T, kind meshapi.AnchorKind, extra ...string) uint64 {
	t.Helper()
	last := c.statusJSON(t).ID
	if out, errOut, err := runCmd(t.Context(), c.rotateArgs(kind, extra...)...); err != nil {
		t.Fatalf("agentmesh ca rotate %s: %v\n%s%s", kind, err, out, errOut)
	}
	st := c.statusJSON(t)
	if st.ID <= last || st.Kind != kind {
		t.Fatalf("after agentmesh ca rotate %s the status shows rotation %d (%s), the last was %d", kind, st.ID, st.Kind, last)
	}
	return st.ID
}

// awaitRotation polls the status of rotation id until check accepts it, and returns it.
func (c *meshCA) awaitRotation(t *testing.T, id uint64, timeout time.Duration, what string, check func(meshapi.RotationStatus) error) meshapi.RotationStatus {
	t.Helper()
	var st meshapi.RotationStatus
	waitFor(t, timeout, what, func() error {
		var err error
		if st, err = c.rotationStatus(t.Context()); err != nil {
			return err
		}
		if st.ID != id {
			return fmt.Errorf("status of rotation %d, want %d", st.ID, id)
		}
		return check(st)
	})
	return st
}

// awaitPhase waits until rotation id is in phase p or past it, and returns its status.
// An abort fails the test.
func (c *meshCA) awaitPhase(t *testing.T, id uint64, p meshapi.AnchorPhase) meshapi.RotationStatus {
	t.Helper()
	return c.awaitRotation(t, id, rotationTimeout, fmt.Sprintf("rotation %d reaching %s", id, p), func(st meshapi.RotationStatus) error {
		if !slices.Contains(rotationPhases, st.Phase) {
			t.Fatalf("rotation %d went to %s: %+v", id, st.Phase, st)
		}
		if !reached(st.Phase, p) {
			return fmt.Errorf("in %s for %d ms, waiting for %q, missing %v (%s)", st.Phase, st.PhaseMS, st.Waiting, st.Missing, st.Error)
		}
		return nil
	})
}

// start starts the stopped CA again on its state directory and waits until its admin
// socket answers. The new process lives until owner (the test that started the mesh)
// ends.
func (c *meshCA) start(t, owner *testing.T, what string) {
	t.Helper()
	c.process = startCmd(owner, "ca", c.h.command(binary, c.args...))
	c.awaitAdmin(t, what)
}

// recordedRotation is the part of the CA's StateDir/rotation.json the crash subtest
// reads: the rotation and the phase recorded, written before the phase's effects run.
type recordedRotation struct {
	ID    uint64              `json:"id"`
	Phase meshapi.AnchorPhase `json:"phase"`
}

// recorded reads the rotation the CA recorded (none: ID 0).
func (c *meshCA) recorded(t *testing.T) recordedRotation {
	t.Helper()
	var rec recordedRotation
	b, err := os.ReadFile(filepath.Join(c.state, "rotation.json"))
	if err == nil {
		err = json.Unmarshal(b, &rec)
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("rotation.json: %v", err)
	}
	return rec
}

// awaitRecorded polls rotation.json every millisecond (prepare and destroy last
// milliseconds) until a rotation after last is recorded in phase p or past it.
func (c *meshCA) awaitRecorded(t *testing.T, last uint64, p meshapi.AnchorPhase) recordedRotation {
	t.Helper()
	var rec recordedRotation
	waitForEvery(t, time.Millisecond, rotationTimeout, fmt.Sprintf("the CA recording a rotation after %d in %s", last, p), func() error {
		if rec = c.recorded(t); rec.ID <= last || !reached(rec.Phase, p) {
			return fmt.Errorf("rotation %d in %s", rec.ID, rec.Phase)
		}
		return nil
	})
	return rec
}

// caKeys lists the labels of the private keys in the CA's SoftHSM token.
func (c *meshCA) caKeys(t *testing.T) []string {
	t.Helper()
	pin := strings.TrimSpace(string(readFile(t, hsm.DefaultPINFile(c.state))))
	return pkcs11Keys(t, filepath.Join(c.state, "softhsm2.conf"), authority.TokenLabel, pin, `agentmesh-\S+`)
}

// anchorView is what a rotation changes: the keys in the CA's token, the anchors it
// serves and the intermediate it issues from.
type anchorView struct {
	keys         []string
	roots        []*x509.Certificate
	intermediate *x509.Certificate
}

func (m *rotationMesh) view(t *testing.T) anchorView {
	t.Helper()
	return anchorView{keys: m.ca.caKeys(t), roots: m.roots(t), intermediate: m.intermediate(t)}
}

// intermediate is the CA's intermediate.crt: the active generation's.
func (m *rotationMesh) intermediate(t *testing.T) *x509.Certificate {
	t.Helper()
	certs := parsePEMCerts(t, readFile(t, filepath.Join(m.ca.state, "intermediate.crt")))
	if len(certs) != 1 {
		t.Fatalf("intermediate.crt holds %d certificates", len(certs))
	}
	return certs[0]
}

// roots returns the anchors the CA serves at GET /roots, trusting its serving
// certificate to chain to its root.crt or to an anchor it served before.
func (m *rotationMesh) roots(t *testing.T) []*x509.Certificate {
	t.Helper()
	pool := x509.NewCertPool()
	for _, c := range append(parsePEMCerts(t, readFile(t, m.ca.root)), m.seenRoots...) {
		pool.AddCert(c)
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}
	resp, err := hc.Get(m.ca.url + "/roots")
	if err != nil {
		t.Fatalf("GET /roots: %v", err)
	}
	defer resp.Body.Close()
	var doc struct {
		Certificates []string `json:"crts"`
	}
	body, err := io.ReadAll(resp.Body)
	// step-ca answers /roots with 201.
	if err != nil || resp.StatusCode/100 != 2 || json.Unmarshal(body, &doc) != nil {
		t.Fatalf("GET /roots: %d %q: %v", resp.StatusCode, body, err)
	}
	var roots []*x509.Certificate
	for _, p := range doc.Certificates {
		roots = append(roots, parsePEMCerts(t, []byte(p))...)
	}
	m.seenRoots = append(m.seenRoots, roots...)
	return roots
}

func parsePEMCerts(t *testing.T, b []byte) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for {
		var block *pem.Block
		if block, b = pem.Decode(b); block == nil {
			return out
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatalf("parse certificate: %v", err)
		}
		out = append(out, c)
	}
}

// sameCerts reports whether a and b hold the same certificates, in any order.
func sameCerts(a, b []*x509.Certificate) bool {
	return len(a) == len(b) && !slices.ContainsFunc(a, func(c *x509.Certificate) bool {
		return !slices.ContainsFunc(b, c.Equal)
	})
}

// rotationRecords are the records of type typ about rotation id in the audit log at
// path.
func rotationRecords(t *testing.T, path, typ string, id uint64) []map[string]any {
	t.Helper()
	return slices.DeleteFunc(readAudit(t, path), func(r map[string]any) bool {
		n, _ := r["rotation_id"].(float64) // a JSON number: exact below 2^53, as IDs (µs) are
		return r["type"] != typ || uint64(n) != id
	})
}

// caRecords are the CA's audit records (ca_rotation) about rotation id.
func (m *rotationMesh) caRecords(t *testing.T, id uint64) []map[string]any {
	t.Helper()
	return rotationRecords(t, m.ca.auditPath(), "ca_rotation", id)
}

func hasRecord(recs []map[string]any, want map[string]string) bool {
	return slices.ContainsFunc(recs, func(r map[string]any) bool { return matches(r, want) })
}

// checkAudit checks the audit records of rotation id: on the CA, one of each phase
// entered and of each acknowledgement of the proxies of acked; on each of those
// proxies, one of each step it acknowledged, and its metric of the last one.
func (m *rotationMesh) checkAudit(t *testing.T, id uint64, acked []string) {
	t.Helper()
	ca := m.caRecords(t, id)
	for _, p := range rotationPhases[1:] {
		if !hasRecord(ca, map[string]string{"action": "phase", "phase": string(p)}) {
			t.Errorf("the CA's audit log has no record of rotation %d entering %s", id, p)
		}
	}
	for _, n := range acked {
		if v := adminMetric(t, m.proxies[n].admin, "agentmesh_proxy_anchor_step_acked_rotation_id", `phase="retire"`); v != float64(id) {
			t.Errorf("%s: agentmesh_proxy_anchor_step_acked_rotation_id{phase=\"retire\"} = %v, want %d", n, v, id)
		}
		own := rotationRecords(t, m.proxies[n].auditPath(), "anchor_step", id)
		for _, p := range []meshapi.AnchorPhase{meshapi.PhaseDistribute, meshapi.PhaseActivate, meshapi.PhaseRetire} {
			if !hasRecord(ca, map[string]string{"action": "ack", "phase": string(p), "host": hostID(n), "result": "ok"}) {
				t.Errorf("the CA's audit log has no record of %s acknowledging %s of rotation %d", n, p, id)
			}
			if !hasRecord(own, map[string]string{"phase": string(p), "spiffe_id": hostID(n), "result": "acknowledged"}) {
				t.Errorf("%s's audit log has no record of its acknowledgement of %s of rotation %d", n, p, id)
			}
		}
	}
}

func idStrings(ids []spiffeid.ID) []string {
	out := make([]string, 0, len(ids))
	for _, id := range ids {
		out = append(out, id.String())
	}
	return out
}
