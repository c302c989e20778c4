package ca

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/ca/authority"
	"github.com/agentmesh/agentmesh/meshapi"
)

// caRotations are the audit records of the rotation of the trust anchors.
func (r *auditRecorder) caRotations(action audit.CARotationAction) []audit.CARotation {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []audit.CARotation
	for _, e := range r.events {
		if rec, ok := e.(audit.CARotation); ok && rec.Action == action {
			out = append(out, rec)
		}
	}
	return out
}

// waitPhase waits (on the admin socket's status) until the rotation is in phase p.
func waitPhase(t *testing.T, ca *runningCA, p meshapi.AnchorPhase) meshapi.RotationStatus {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		st, err := RotationStatus(context.Background(), ca.cfg.StateDir)
		if err != nil {
			t.Fatalf("rotation status: %v", err)
		}
		if st.Phase == p {
			return *st
		}
		if time.Now().After(deadline) {
			t.Fatalf("phase %s, want %s (waiting: %s)", st.Phase, p, st.Waiting)
		}
		<-tick.C
	}
}

// anchorStep is the step the directory publishes now.
func anchorStep(t *testing.T, ca *runningCA) *meshapi.AnchorRotation {
	t.Helper()
	doc, err := RequestDirectory(context.Background(), ca.cfg.StateDir)
	if err != nil {
		t.Fatalf("directory: %v", err)
	}
	return doc.AnchorRotation
}

// ackAs POSTs an acknowledgement with hc's certificate and returns the status.
func ackAs(t *testing.T, ca *runningCA, hc *http.Client, ack any) int {
	t.Helper()
	status, body := do(t, hc, http.MethodPost, ca.URL()+meshapi.Prefix+meshapi.AnchorAckPath, ack)
	t.Logf("ack %+v: %d %s", ack, status, body)
	return status
}

// caWithHost starts an audited CA with host /host/a registered.
func caWithHost(t *testing.T) (Config, *auditRecorder, *runningCA, spiffeid.ID, *http.Client) {
	t.Helper()
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	cfg.Audit = rec
	ca := startCA(t, cfg)
	hostA := spiffeid.RequireFromPath(testTD, "/host/a")
	return cfg, rec, ca, hostA, registeredHost(t, ca, hostA)
}

// registeredHost enrols host, registers it in the directory (a member of the next
// rotation) and returns a client presenting its SVID.
func registeredHost(t *testing.T, ca *runningCA, host spiffeid.ID) *http.Client {
	t.Helper()
	hc := httpsClient(t, ca, tlsCert(enroll(t, ca, host)))
	if status, body := do(t, hc, http.MethodPost, ca.URL()+meshapi.Prefix+meshapi.RegisterPath,
		registerBody(15008, "127.0.0.1")); status != http.StatusOK {
		t.Fatalf("register: %d %s", status, body)
	}
	return hc
}

func ackOf(st *meshapi.AnchorRotation) meshapi.AnchorAck {
	return meshapi.AnchorAck{ID: st.ID, Phase: st.Phase, BundleVersion: st.BundleVersion}
}

// A rotation on a real CA, driven by a proxy's acknowledgements through the mesh API:
// refused acknowledgements (not a host, malformed, stale, never published), a second
// start refused with the phase, the expiry gate of activate, the audit trail, the
// metrics and the end of the step in the directory.
func TestAnchorRotationAcknowledged(t *testing.T) {
	cfg, rec, ca, hostA, hcA := caWithHost(t)
	hcAgent := httpsClient(t, ca, tlsCert(enroll(t, ca, spiffeid.RequireFromPath(testTD, "/agent/x"))))
	ctx := context.Background()
	oldIssuer := meshapi.KeyFingerprint(ca.auth.Active().Intermediate)

	st, err := StartRotation(ctx, cfg.StateDir, meshapi.RotateRequest{Kind: meshapi.RotateIntermediate, Reason: "test"})
	if err != nil {
		t.Fatalf("rotate: %v", err)
	}
	if st.Phase != meshapi.PhaseDistribute || len(st.Missing) != 1 || st.Missing[0] != hostA {
		t.Fatalf("after rotate: phase %s missing %v, want distribute waiting for %s", st.Phase, st.Missing, hostA)
	}
	_, err = StartRotation(ctx, cfg.StateDir, meshapi.RotateRequest{Kind: meshapi.RotateRoot})
	if re := (*meshapi.ResponseError)(nil); !errors.As(err, &re) || re.Status != http.StatusConflict {
		t.Fatalf("second rotate: %v, want 409", err)
	}

	step := anchorStep(t, ca)
	if step == nil || step.Phase != meshapi.PhaseDistribute || step.Probe == "" || step.Issuer != "" {
		t.Fatalf("directory step = %+v", step)
	}
	refusals := []struct {
		name   string
		hc     *http.Client
		body   any
		status int
	}{
		{"not a host", hcAgent, ackOf(step), http.StatusForbidden},
		{"malformed", hcA, map[string]any{"id": "x"}, http.StatusBadRequest},
		{"other rotation", hcA, meshapi.AnchorAck{ID: step.ID + 1, Phase: step.Phase, BundleVersion: step.BundleVersion}, http.StatusConflict},
		{"other phase", hcA, meshapi.AnchorAck{ID: step.ID, Phase: meshapi.PhaseRetire, BundleVersion: step.BundleVersion}, http.StatusConflict},
		{"never published", hcA, meshapi.AnchorAck{ID: step.ID, Phase: step.Phase, BundleVersion: "0123456789abcdef"}, http.StatusBadRequest},
	}
	for _, tc := range refusals {
		if got := ackAs(t, ca, tc.hc, tc.body); got != tc.status {
			t.Errorf("%s: %d, want %d", tc.name, got, tc.status)
		}
	}
	if got := len(rec.caRotations(audit.CARotationAck)); got != len(refusals) {
		t.Errorf("%d ack audit records, want one per refusal (%d)", got, len(refusals))
	}

	if got := ackAs(t, ca, hcA, ackOf(step)); got != http.StatusOK {
		t.Fatalf("ack distribute: %d", got)
	}
	waitPhase(t, ca, meshapi.PhaseActivate)
	step = anchorStep(t, ca)
	if step.Issuer != meshapi.KeyFingerprint(ca.auth.Active().Intermediate) {
		t.Fatalf("activate issuer %q, want the active intermediate's", step.Issuer)
	}
	if step.Issuer != oldIssuer {
		// The proxy still holds its SVID from the old key: not converged yet.
		if got := ackAs(t, ca, hcA, ackOf(step)); got != http.StatusPreconditionFailed {
			t.Fatalf("ack activate with an SVID of the old issuer: %d, want 412", got)
		}
		hcA = httpsClient(t, ca, tlsCert(enroll(t, ca, hostA)))
	}
	if got := ackAs(t, ca, hcA, ackOf(step)); got != http.StatusOK {
		t.Fatalf("ack activate: %d", got)
	}
	// Acknowledged, but what the old key issued is still valid: activate holds.
	ca.tickAnchor(time.Now())
	if st := ca.AnchorRotationStatus(); st.Phase != meshapi.PhaseActivate || len(st.Missing) != 0 {
		t.Fatalf("before expiry: phase %s missing %v (waiting %q)", st.Phase, st.Missing, st.Waiting)
	}
	ca.tickAnchor(time.Now().Add(cfg.SVIDLifetime + backdate(cfg.SVIDLifetime)))
	waitPhase(t, ca, meshapi.PhaseRetire)
	if got := ackAs(t, ca, hcA, ackOf(anchorStep(t, ca))); got != http.StatusOK {
		t.Fatalf("ack retire: %d", got)
	}
	st2 := waitPhase(t, ca, meshapi.PhaseDone)
	if anchorStep(t, ca) != nil {
		t.Fatal("the directory still publishes a step after done")
	}
	var phases []meshapi.AnchorPhase
	for _, p := range st2.Phases {
		phases = append(phases, p.Phase)
	}
	if fmt.Sprint(phases) != "[prepare distribute activate retire destroy]" {
		t.Fatalf("phases %v", phases)
	}
	// One record per phase entered: prepare, distribute, activate, retire, destroy, done.
	if got := len(rec.caRotations(audit.CARotationPhase)); got != 6 {
		t.Fatalf("%d phase audit records, want 6", got)
	}
	if !ca.deny.Load().list.DeniesIssuer(oldIssuer) {
		t.Fatal("the replaced issuer is not on the deny-list after destroy")
	}
}

// hsmRefusing is the authority with a token that refuses key generation.
type hsmRefusing struct{ anchorAuthority }

func (hsmRefusing) Prepare(meshapi.AnchorKind) (authority.Generation, error) {
	return authority.Generation{}, fmt.Errorf("%w: CKR_DEVICE_MEMORY", ErrHSM)
}

// The HSM refusing key generation leaves no rotation: a clear error (503), no
// record, the CA in its old state, and an audit record of the failure.
func TestAnchorRotationHSMRefusal(t *testing.T) {
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	cfg.Audit = rec
	ca := startCAWith(t, cfg, func(s *Server) { s.anchor.auth = hsmRefusing{s.auth} })
	_, err := StartRotation(context.Background(), cfg.StateDir, meshapi.RotateRequest{Kind: meshapi.RotateRoot})
	if re := (*meshapi.ResponseError)(nil); !errors.As(err, &re) || re.Status != http.StatusServiceUnavailable {
		t.Fatalf("rotate: %v, want 503", err)
	}
	if st := ca.AnchorRotationStatus(); st.ID != 0 {
		t.Fatalf("status after a refused prepare: %+v", st)
	}
	if _, err := os.Stat(filepath.Join(cfg.StateDir, fileAnchorRotation)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("rotation record left behind: %v", err)
	}
	starts := rec.caRotations(audit.CARotationStart)
	if len(starts) != 1 || starts[0].Result != audit.ResultError {
		t.Fatalf("start audit records %+v", starts)
	}
}

// A CA stopped in the middle of a rotation starts again in the phase it recorded:
// the directory publishes the same step, acknowledgements recorded before the stop
// stand, and the rotation goes on.
func TestAnchorRotationResumesAfterRestart(t *testing.T) {
	cfg, _ := testConfig(t)
	first := startCA(t, cfg)
	hostA := spiffeid.RequireFromPath(testTD, "/host/a")
	hostB := spiffeid.RequireFromPath(testTD, "/host/b")
	hcA := registeredHost(t, first, hostA)
	ctx := context.Background()
	// b is down: excluded from the start.
	if _, err := StartRotation(ctx, cfg.StateDir, meshapi.RotateRequest{Kind: meshapi.RotateRoot,
		Exclude: []spiffeid.ID{hostB}}); err != nil {
		t.Fatalf("rotate: %v", err)
	}
	step := anchorStep(t, first)
	if got := ackAs(t, first, hcA, ackOf(step)); got != http.StatusOK {
		t.Fatalf("ack distribute: %d", got)
	}
	st := waitPhase(t, first, meshapi.PhaseActivate)
	if err := first.stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}

	second := startCA(t, cfg)
	again := second.AnchorRotationStatus()
	if again.ID != st.ID || again.Phase != meshapi.PhaseActivate || len(again.Members) != 2 {
		t.Fatalf("after restart: %+v, want rotation %d in activate with a and b", again, st.ID)
	}
	step2 := anchorStep(t, second)
	if step2 == nil || step2.ID != st.ID || step2.Phase != meshapi.PhaseActivate || step2.Issuer == "" {
		t.Fatalf("step after restart = %+v", step2)
	}
	hcA2 := httpsClient(t, second, tlsCert(enroll(t, second, hostA)))
	if got := ackAs(t, second, hcA2, ackOf(step2)); got != http.StatusOK {
		t.Fatalf("ack activate after restart: %d", got)
	}
	second.tickAnchor(time.Now().Add(cfg.SVIDLifetime + backdate(cfg.SVIDLifetime)))
	waitPhase(t, second, meshapi.PhaseRetire)
}

// Abort goes back through abort and abort-retire, acknowledged, and discards the new
// generation; with no rotation it is refused. An exclusion unblocks a gate and is
// audited.
func TestAnchorRotationAbortAndExclude(t *testing.T) {
	cfg, rec, ca, hostA, hcA := caWithHost(t)
	ctx := context.Background()
	if _, err := AbortRotation(ctx, cfg.StateDir, "nothing to abort"); err == nil {
		t.Fatal("abort with no rotation: accepted")
	}
	if _, err := StartRotation(ctx, cfg.StateDir, meshapi.RotateRequest{Kind: meshapi.RotateIntermediate}); err != nil {
		t.Fatalf("rotate: %v", err)
	}
	if _, err := AbortRotation(ctx, cfg.StateDir, "changed my mind"); err != nil {
		t.Fatalf("abort: %v", err)
	}
	step := anchorStep(t, ca)
	if step.Phase != meshapi.PhaseAbort || step.Issuer != meshapi.KeyFingerprint(ca.auth.Active().Intermediate) {
		t.Fatalf("step after abort = %+v", step)
	}
	if got := ackAs(t, ca, hcA, ackOf(step)); got != http.StatusOK {
		t.Fatalf("ack abort: %d", got)
	}
	waitPhase(t, ca, meshapi.PhaseAbortRetire)
	// a goes silent: the operator excludes it instead of waiting.
	if _, err := ExcludeFromRotation(ctx, cfg.StateDir, meshapi.RotationExclude{Host: hostA, Reason: "host retired"}); err != nil {
		t.Fatalf("exclude: %v", err)
	}
	waitPhase(t, ca, meshapi.PhaseAborted)
	if _, ok := ca.auth.Next(); ok {
		t.Fatal("the prepared generation is still held after the abort")
	}
	ex := rec.caRotations(audit.CARotationExclude)
	if len(ex) != 1 || ex[0].Host != hostA.String() || ex[0].Reason != "host retired" {
		t.Fatalf("exclusion audit records %+v", ex)
	}
	if _, err := ExcludeFromRotation(ctx, cfg.StateDir, meshapi.RotationExclude{Host: hostA}); err == nil {
		t.Fatal("exclude after the rotation ended: accepted")
	}
}

// gaugeValue is the value of the gauge name with labels in reg, and whether it exists.
func gaugeValue(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
					continue metrics
				}
			}
			return m.GetGauge().GetValue(), true
		}
	}
	return 0, false
}

// The metrics follow the rotation: the current phase, who is missing, and the
// expiry of every anchor in force.
func TestAnchorRotationMetrics(t *testing.T) {
	cfg, _ := testConfig(t)
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	ca := startCA(t, cfg)
	root := ca.auth.Active().Root
	v, ok := gaugeValue(t, reg, metricAnchorNotAfter, map[string]string{labelRole: string(roleRoot),
		labelFingerprint: meshapi.KeyFingerprint(root)})
	if !ok || int64(v) != root.NotAfter.Unix() {
		t.Fatalf("%s = %v (present %v), want %d", metricAnchorNotAfter, v, ok, root.NotAfter.Unix())
	}
	hostB := spiffeid.RequireFromPath(testTD, "/host/b")
	if _, err := StartRotation(context.Background(), cfg.StateDir, meshapi.RotateRequest{Kind: meshapi.RotateIntermediate,
		Exclude: []spiffeid.ID{hostB}}); err != nil {
		t.Fatalf("rotate: %v", err)
	}
	ca.tickAnchor(time.Now())
	// No live proxy but the excluded one: distribute passes at once, activate waits
	// for the expiry of what the old key issued.
	for labels, want := range map[[2]string]float64{
		{metricRotationPhase, string(meshapi.PhaseActivate)}:   1,
		{metricRotationPhase, string(meshapi.PhaseDistribute)}: 0,
		{metricRotationMembers, string(memberExcluded)}:        1,
		{metricRotationMembers, string(memberMissing)}:         0,
	} {
		label := labelPhase
		if labels[0] == metricRotationMembers {
			label = labelState
		}
		if got, _ := gaugeValue(t, reg, labels[0], map[string]string{label: labels[1]}); got != want {
			t.Errorf("%s{%s} = %v, want %v", labels[0], labels[1], got, want)
		}
	}
}
