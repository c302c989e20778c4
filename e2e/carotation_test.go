package e2e

import (
	"crypto/x509"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/internal/softhsmtest"
	"github.com/agentmesh/agentmesh/meshapi"
)

// TestCARotation rotates the CA's intermediate and then its root while proxies in
// network namespaces carry new connections and long-lived ones over the tls, h2 and
// quic transports, each rotation driven only by `agentmesh ca rotate` and waits on its
// status (docs/ca-rotation.md). Every rotation must complete with no failed request and
// no long-lived connection cut sooner than a drain allows, with the old keys gone from
// the CA's token, /roots serving both roots during the overlap and only the new one
// after, and every proxy presenting an SVID from the new intermediate.
//
// Then: a proxy cut off the CA holds the rotation in distribute, named in the status,
// until the cut is lifted; the CA killed with SIGKILL in each phase resumes; a root
// rotation aborted once every proxy holds SVIDs from the new key returns to the old
// anchor; and a proxy cut off and excluded lets the rotation complete without it,
// audited.
func TestCARotation(t *testing.T) {
	requireE2E(t)
	requireRoot(t)
	softhsmtest.RequireTool(t, "pkcs11-tool")
	m := startRotationMesh(t)
	for _, sub := range []struct {
		name string
		run  func(*testing.T)
	}{
		{"full", m.fullRotations},
		{"partition", m.partitionRotation},
		{"crash", m.crashRotation},
		{"abort", m.abortRotation},
		{"exclude", m.excludeRotation},
	} {
		// Each rotation starts from where the last one ended: one that failed to
		// complete makes the next refused, naming its phase.
		t.Run(sub.name, sub.run)
	}
}

// fullRotations rotates the intermediate, then the root.
func (m *rotationMesh) fullRotations(t *testing.T) {
	mark := m.mark()
	for _, kind := range []meshapi.AnchorKind{meshapi.RotateIntermediate, meshapi.RotateRoot} {
		before := m.view(t)
		id := m.ca.rotate(t, kind)
		// Activation lasts at least an SVID lifetime: the overlap is observed there.
		if st := m.ca.awaitPhase(t, id, meshapi.PhaseActivate); st.Phase == meshapi.PhaseActivate {
			m.checkOverlap(t, kind, before, st)
			// A second rotation is refused, naming the phase of the one running.
			out, errOut, err := runCmd(t.Context(), m.ca.rotateArgs(meshapi.RotateRoot)...)
			if err == nil || !strings.Contains(errOut, "phase activate") {
				t.Errorf("agentmesh ca rotate root while rotation %d is in activate: %v\n%s%s", id, err, out, errOut)
			}
		}
		m.checkDone(t, kind, id, before, allHosts)
	}
	m.checkLoad(t, "full", mark)
}

// partitionRotation cuts d off the CA before a rotation starts: the rotation waits in
// distribute with d missing, and completes once the cut is lifted.
func (m *rotationMesh) partitionRotation(t *testing.T) {
	mark := m.mark()
	before := m.view(t)
	lift := m.cut(t, "d")
	id := m.ca.rotate(t, meshapi.RotateIntermediate)
	d := hostID("d")
	acked := m.ca.awaitRotation(t, id, rotationTimeout, "a, b and c acknowledging distribute, d missing", func(st meshapi.RotationStatus) error {
		if st.Phase != meshapi.PhaseDistribute {
			t.Fatalf("rotation %d left distribute while d was cut off: %+v", id, st)
		}
		if missing := idStrings(st.Missing); !slices.Equal(missing, []string{d}) {
			return fmt.Errorf("missing %v", missing)
		}
		return nil
	})
	// The CA reconsiders its gate on every heartbeat: once a, b and c have each sent
	// one after the last acknowledgement, it has had the chance to activate. A member
	// holds the gate live or not: d is waited for until it shows as down. d's SVID must
	// outlive the cut (rotationProxyConfig): these waits take seconds.
	lastAck := latestAck(acked, loadHosts)
	st := m.ca.awaitRotation(t, id, 30*time.Second, "heartbeats of a, b and c after their acknowledgements, d down", func(st meshapi.RotationStatus) error {
		if st.Phase != meshapi.PhaseDistribute {
			t.Fatalf("rotation %d left distribute while d was cut off: %+v", id, st)
		}
		for _, n := range loadHosts {
			if mb := member(st, hostID(n)); !mb.LastHeartbeat.After(lastAck) || !mb.Live {
				return fmt.Errorf("%s: last heartbeat %v, live %v", n, mb.LastHeartbeat, mb.Live)
			}
		}
		if member(st, d).Live {
			return errors.New("d still live")
		}
		return nil
	})
	m.checkHeld(t, st, d)
	lift()
	lifted := time.Now()
	m.ca.awaitPhase(t, id, meshapi.PhaseActivate)
	fmt.Printf("carotation partition: activated %d ms after the cut was lifted\n", time.Since(lifted).Milliseconds())
	m.checkDone(t, meshapi.RotateIntermediate, id, before, allHosts)
	m.checkLoad(t, "partition", mark)
}

// checkHeld checks what the operator sees of a rotation held in distribute by the
// member missing, cut off: the status, the metrics and the human status.
func (m *rotationMesh) checkHeld(t *testing.T, st meshapi.RotationStatus, missing string) {
	t.Helper()
	if mb := member(st, missing); mb.Acked == meshapi.PhaseDistribute || !slices.Equal(idStrings(st.Missing), []string{missing}) {
		t.Errorf("status while %s is cut off: %+v, missing %v", missing, mb, st.Missing)
	}
	for series, want := range map[string]float64{`agentmesh_ca_rotation_phase{phase="distribute"}`: 1,
		`agentmesh_ca_rotation_members{state="missing"}`: 1, `agentmesh_ca_rotation_members{state="acked"}`: float64(len(st.Members) - 1)} {
		name, labels, _ := strings.Cut(strings.TrimSuffix(series, "}"), "{")
		if v, _ := m.caMetric(t, name, labels); v != want {
			t.Errorf("%s = %v while %s is cut off, want %v", series, v, missing, want)
		}
	}
	out := m.ca.rotationCLI(t, "status")
	if !strings.Contains(out, "phase "+string(meshapi.PhaseDistribute)) ||
		!regexp.MustCompile(`(?m)^missing\s+`+regexp.QuoteMeta(missing)+`\s+down\s+last heartbeat \d{4}-`).MatchString(out) {
		t.Errorf("agentmesh ca rotation status does not name the phase and %s, down, with its last heartbeat:\n%s", missing, out)
	}
}

// crashRotation rotates the root and kills the CA with SIGKILL once in each phase,
// restarting it each time on the same state: the rotation must resume and complete.
// Prepare and destroy last milliseconds: the kill is sent as soon as the CA has
// recorded the phase, and whether it landed there is read from what the dead CA left.
func (m *rotationMesh) crashRotation(t *testing.T) {
	mark := m.mark()
	before := m.view(t)
	last := m.ca.statusJSON(t).ID
	answered := make(chan error, 1)
	go func() {
		out, errOut, err := runCmd(t.Context(), m.ca.rotateArgs(meshapi.RotateRoot)...)
		if err != nil {
			err = fmt.Errorf("%w: %s%s", err, out, errOut)
		}
		answered <- err
	}()
	var killed, missed []meshapi.AnchorPhase
	var id uint64
	for _, p := range rotationPhases[:len(rotationPhases)-1] {
		rec := m.ca.awaitRecorded(t, last, p)
		id = rec.ID
		if rec.Phase == p {
			if err := m.ca.cmd.Process.Kill(); err != nil {
				t.Fatalf("kill the ca: %v", err)
			}
			<-m.ca.done
			rec = m.ca.recorded(t)
			m.ca.start(t, m.t, "the ca restarted after SIGKILL in "+string(rec.Phase))
		}
		if rec.Phase != p {
			missed = append(missed, p)
			continue
		}
		killed = append(killed, p)
	}
	// The command's CA may have been killed under it, in prepare.
	t.Logf("agentmesh ca rotate root answered: %v", <-answered)
	fmt.Printf("carotation crash: killed in %v, phase passed before the kill landed: %v\n", killed, missed)
	for _, p := range []meshapi.AnchorPhase{meshapi.PhaseDistribute, meshapi.PhaseActivate, meshapi.PhaseRetire} {
		if !slices.Contains(killed, p) {
			t.Errorf("the CA was not killed in %s, a phase that waits for the proxies", p)
		}
	}
	m.checkDone(t, meshapi.RotateRoot, id, before, allHosts)
	m.checkLoad(t, "crash", mark)
}

// abortRotation starts a root rotation and aborts it once every proxy has renewed from
// the new key: the CA issues from the old key again, every proxy renews back and
// acknowledges, the new root is withdrawn and the new keys leave the token.
func (m *rotationMesh) abortRotation(t *testing.T) {
	mark := m.mark()
	before := m.view(t)
	id := m.ca.rotate(t, meshapi.RotateRoot)
	m.ca.awaitRotation(t, id, rotationTimeout, "every proxy acknowledging activate", func(st meshapi.RotationStatus) error {
		if st.Phase != meshapi.PhaseActivate || len(st.Missing) > 0 {
			return fmt.Errorf("in %s, missing %v", st.Phase, st.Missing)
		}
		return nil
	})
	m.ca.rotationCLI(t, "abort", "--reason", "e2e abort")
	st := m.ca.awaitRotation(t, id, rotationTimeout, "the rotation aborted", func(st meshapi.RotationStatus) error {
		if st.Phase != meshapi.PhaseAborted {
			return fmt.Errorf("in %s for %d ms, waiting for %q, missing %v (%s)", st.Phase, st.PhaseMS, st.Waiting, st.Missing, st.Error)
		}
		return nil
	})
	var passed []meshapi.AnchorPhase
	for _, p := range st.Phases {
		fmt.Printf("carotation kind=root aborted phase=%s ms=%d\n", p.Phase, p.MS)
		passed = append(passed, p.Phase)
	}
	want := []meshapi.AnchorPhase{meshapi.PhasePrepare, meshapi.PhaseDistribute, meshapi.PhaseActivate, meshapi.PhaseAbort, meshapi.PhaseAbortRetire}
	if !slices.Equal(passed, want) {
		t.Errorf("aborted rotation passed %v, want %v", passed, want)
	}
	after := m.view(t)
	if !slices.Equal(sorted(after.keys), sorted(before.keys)) || !sameCerts(after.roots, before.roots) || !after.intermediate.Equal(before.intermediate) {
		t.Errorf("after the abort: keys %v, roots %s; before: keys %v, roots %s; same intermediate: %v",
			after.keys, subjects(after.roots), before.keys, subjects(before.roots), after.intermediate.Equal(before.intermediate))
	}
	m.checkPresented(t, allHosts, after)
	ca := m.caRecords(t, id)
	for _, p := range []meshapi.AnchorPhase{meshapi.PhaseAbort, meshapi.PhaseAbortRetire, meshapi.PhaseAborted} {
		if !hasRecord(ca, map[string]string{"action": "phase", "phase": string(p)}) {
			t.Errorf("the CA's audit log has no record of rotation %d entering %s", id, p)
		}
	}
	if !hasRecord(ca, map[string]string{"action": "abort", "result": "ok"}) {
		t.Errorf("the CA's audit log has no record of the abort of rotation %d", id)
	}
	m.checkLoad(t, "abort", mark)
}

func sorted(s []string) []string { return slices.Sorted(slices.Values(s)) }

// excludeRotation cuts d off the CA and rotates with d excluded: the rotation
// completes without it and the exclusion is audited. d stays behind: its SVIDs expire.
func (m *rotationMesh) excludeRotation(t *testing.T) {
	mark := m.mark()
	before := m.view(t)
	m.cut(t, "d")
	d := hostID("d")
	id := m.ca.rotate(t, meshapi.RotateIntermediate, "--exclude", d)
	st := m.checkDone(t, meshapi.RotateIntermediate, id, before, loadHosts)
	if mb := member(st, d); !mb.Excluded {
		t.Errorf("d in the status of a rotation that excluded it: %+v", mb)
	}
	if !hasRecord(m.caRecords(t, id), map[string]string{"action": "exclude", "host": d, "result": "ok"}) {
		t.Errorf("the CA's audit log has no record of the exclusion of %s from rotation %d", d, id)
	}
	m.checkLoad(t, "exclude", mark)
}

// checkOverlap checks the anchors served while both generations are trusted.
func (m *rotationMesh) checkOverlap(t *testing.T, kind meshapi.AnchorKind, before anchorView, st meshapi.RotationStatus) {
	t.Helper()
	roots := m.roots(t)
	switch {
	case kind == meshapi.RotateIntermediate && !sameCerts(roots, before.roots):
		t.Errorf("%s rotation in %s: /roots serves %d anchors, want the root unchanged", kind, st.Phase, len(roots))
	case kind == meshapi.RotateRoot && (len(roots) != 2 || !slices.ContainsFunc(roots, before.roots[0].Equal)):
		t.Errorf("%s rotation in %s: /roots serves %s, want the old root and the new", kind, st.Phase, subjects(roots))
	}
	if len(st.Anchors) != len(roots) {
		t.Errorf("%s rotation in %s: the status lists %d anchors, /roots %d", kind, st.Phase, len(st.Anchors), len(roots))
	}
}

// checkDone waits until rotation id is done and checks its outcome against the view
// before it: every proxy of acked acknowledged, the old keys gone from the token, only
// the new anchor served, every proxy of acked presenting an SVID from the new
// intermediate, the audit records. It prints the time of each phase and returns the
// last status.
func (m *rotationMesh) checkDone(t *testing.T, kind meshapi.AnchorKind, id uint64, before anchorView, acked []string) meshapi.RotationStatus {
	t.Helper()
	m.ca.awaitPhase(t, id, meshapi.PhaseDone)
	st := m.ca.statusJSON(t)
	if st.ID != id || st.Phase != meshapi.PhaseDone || len(st.Missing) != 0 || st.Error != "" {
		t.Fatalf("status after rotation %d: %+v", id, st)
	}
	m.checkPhases(t, kind, st)
	for _, n := range acked {
		if mb := member(st, hostID(n)); mb.Excluded || mb.Acked != meshapi.PhaseRetire {
			t.Errorf("%s rotation done with %s's last acknowledgement %q, want retire", kind, n, mb.Acked)
		}
	}
	after := m.view(t)
	m.checkKeys(t, kind, before.keys, after.keys)
	if len(after.roots) != 1 || (kind == meshapi.RotateRoot) == sameCerts(after.roots, before.roots) {
		t.Errorf("%s rotation done: /roots serves %s, was %s", kind, subjects(after.roots), subjects(before.roots))
	}
	if after.intermediate.Equal(before.intermediate) {
		t.Errorf("%s rotation done: intermediate.crt is the old intermediate", kind)
	}
	m.checkPresented(t, acked, after)
	m.checkAnchorMetric(t, after)
	m.checkAudit(t, id, acked)
	return st
}

// checkPhases prints the time of each phase and checks that activation outlasted the
// certificates issued before it.
func (m *rotationMesh) checkPhases(t *testing.T, kind meshapi.AnchorKind, st meshapi.RotationStatus) {
	t.Helper()
	var passed []meshapi.AnchorPhase
	for _, p := range st.Phases {
		fmt.Printf("carotation kind=%s phase=%s ms=%d\n", kind, p.Phase, p.MS)
		passed = append(passed, p.Phase)
		if p.Phase == meshapi.PhaseActivate && p.MS < rotationLifetime.Milliseconds() {
			t.Errorf("%s rotation: activate lasted %d ms, less than an SVID lifetime", kind, p.MS)
		}
	}
	if want := rotationPhases[:len(rotationPhases)-1]; !slices.Equal(passed, want) {
		t.Errorf("%s rotation passed %v, want %v", kind, passed, want)
	}
}

// checkKeys checks that a rotation of kind replaced the intermediate's key (and the
// root's) in the CA's token with new ones, and left the rest.
func (m *rotationMesh) checkKeys(t *testing.T, kind meshapi.AnchorKind, before, after []string) {
	t.Helper()
	gone := slices.DeleteFunc(slices.Clone(before), func(l string) bool { return slices.Contains(after, l) })
	added := slices.DeleteFunc(slices.Clone(after), func(l string) bool { return slices.Contains(before, l) })
	roles := []string{"intermediate"}
	if kind == meshapi.RotateRoot {
		roles = []string{"intermediate", "root"}
	}
	for _, keys := range [][]string{gone, added} {
		var got []string
		for _, l := range keys {
			got = append(got, strings.TrimRight(strings.TrimPrefix(l, "agentmesh-"), "-0123456789"))
		}
		slices.Sort(got)
		if !slices.Equal(got, roles) {
			t.Errorf("%s rotation: keys %v in the token, was %v: want the %v keys replaced", kind, after, before, roles)
			return
		}
	}
}

// checkPresented checks that each proxy of names presents an SVID issued by the
// intermediate of view that verifies with view's roots alone.
func (m *rotationMesh) checkPresented(t *testing.T, names []string, view anchorView) {
	t.Helper()
	pool := x509.NewCertPool()
	for _, r := range view.roots {
		pool.AddCert(r)
	}
	for _, n := range names {
		chain := presentedChain(t, m.hosts[n].ip+":15008")
		if len(chain) < 2 || !chain[1].Equal(view.intermediate) {
			t.Errorf("%s presents a chain of %d certificates not issued by the new intermediate", n, len(chain))
			continue
		}
		inter := x509.NewCertPool()
		inter.AddCert(chain[1])
		if _, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Errorf("%s's SVID does not verify with the new anchor alone: %v", n, err)
		}
	}
}

// checkAnchorMetric checks that the CA exposes the expiry of each root in view and of
// its intermediate.
func (m *rotationMesh) checkAnchorMetric(t *testing.T, view anchorView) {
	t.Helper()
	for role, certs := range map[string][]*x509.Certificate{"root": view.roots, "intermediate": {view.intermediate}} {
		for _, c := range certs {
			labels := []string{`role="` + role + `"`, `fingerprint="` + meshapi.KeyFingerprint(c) + `"`}
			if v, ok := m.caMetric(t, "agentmesh_ca_anchor_not_after_seconds", labels...); !ok || int64(v) != c.NotAfter.Unix() {
				t.Errorf("agentmesh_ca_anchor_not_after_seconds%v = %v (present: %v), want %d", labels, v, ok, c.NotAfter.Unix())
			}
		}
	}
}

func member(st meshapi.RotationStatus, id string) meshapi.RotationMember {
	for _, mb := range st.Members {
		if mb.ID.String() == id {
			return mb
		}
	}
	return meshapi.RotationMember{}
}

// latestAck is the time of the latest acknowledgement of the members names.
func latestAck(st meshapi.RotationStatus, names []string) time.Time {
	var last time.Time
	for _, n := range names {
		if at := member(st, hostID(n)).AckedAt; at.After(last) {
			last = at
		}
	}
	return last
}

func subjects(certs []*x509.Certificate) string {
	var s []string
	for _, c := range certs {
		s = append(s, fmt.Sprintf("%s (%.12s)", c.Subject, meshapi.KeyFingerprint(c)))
	}
	return "[" + strings.Join(s, ", ") + "]"
}
