package node

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/rotator"
)

// errStale stands for the CA's answer that a step is not its current one.
var errStale = errors.New("stale step")

// ackRecorder stands for the CA's acknowledgement endpoint: it records each
// acknowledgement with its time, and answers each with the next of fail (nil: accepted)
// once fail is exhausted.
type ackRecorder struct {
	mu   sync.Mutex
	acks []meshapi.AnchorAck
	at   []time.Time
	fail []error
}

func (r *ackRecorder) AckAnchor(_ context.Context, ack meshapi.AnchorAck) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.acks, r.at = append(r.acks, ack), append(r.at, time.Now())
	if len(r.fail) == 0 {
		return nil
	}
	err := r.fail[0]
	r.fail = r.fail[1:]
	return err
}

func (*ackRecorder) StaleStep(err error) bool { return errors.Is(err, errStale) }

func (r *ackRecorder) failNext(errs ...error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.fail = errs
}

func (r *ackRecorder) list() ([]meshapi.AnchorAck, []time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]meshapi.AnchorAck(nil), r.acks...), append([]time.Time(nil), r.at...)
}

// probeOf is a PEM probe chain issued by ca.
func probeOf(t *testing.T, ca *testca.CA) string {
	t.Helper()
	svid := ca.SVID(t, spiffeid.RequireFromPath(ca.TrustDomain(), "/agentmesh/probe"))
	var b strings.Builder
	for _, c := range svid.Certificates {
		_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.String()
}

// stepState is a mesh state of directory version v publishing roots and step, with
// the planner agent registered to this host.
func stepState(t *testing.T, v uint64, roots []*x509.Certificate, step *meshapi.AnchorRotation) *meshapi.State {
	t.Helper()
	doc := meshapi.DirectoryDocument{Bundle: meshapi.NewBundleDocument(roots), AnchorRotation: step,
		Entries: []meshapi.Entry{{ID: planner, Host: testHost, UID: 1001}}}
	if step != nil {
		step.BundleVersion = doc.Bundle.Version
	}
	return stateOf(t, v, doc, nil)
}

// issuerOf is the KeyFingerprint of ca's issuing certificate.
func issuerOf(ca *testca.CA) string {
	inter, _ := ca.Intermediate()
	return meshapi.KeyFingerprint(inter)
}

func currentSVID(t *testing.T, r *rotator.Rotator) *x509svid.SVID {
	t.Helper()
	s, err := r.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestAnchorRotationSteps walks a root rotation: distribute is acknowledged without a
// renewal; activate renews the host's and the agent's SVIDs from the new issuer, each
// within the renew window, before acknowledging; retire drops the old root, which no
// SVID needs any more. Each step is audited and the metric names the last one.
func TestAnchorRotationSteps(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, src := followed(t)
		old := f.ca
		next := testca.New(t, testca.WithTrustDomain(testHost.TrustDomain()))
		both := append(old.Roots(), next.Roots()...)

		dist := &meshapi.AnchorRotation{ID: 7, Kind: meshapi.RotateRoot, Phase: meshapi.PhaseDistribute, Probe: probeOf(t, next)}
		src.publish(stepState(t, 1, both, dist))
		synctest.Wait()
		agent, ok := f.agents.lookup(planner)
		if !ok {
			t.Fatal("the registered agent is not held")
		}
		acks, _ := f.acker.list()
		if len(acks) != 1 || acks[0] != (meshapi.AnchorAck{ID: 7, Phase: meshapi.PhaseDistribute, BundleVersion: dist.BundleVersion}) {
			t.Fatalf("acks %+v, want distribute's", acks)
		}
		if v := f.rot.Status().Current.Version; v != 1 {
			t.Fatalf("host at version %d after distribute, want no renewal", v)
		}

		f.issuer.use(next)
		const window = 10 * time.Second
		act := &meshapi.AnchorRotation{ID: 7, Kind: meshapi.RotateRoot, Phase: meshapi.PhaseActivate, Probe: probeOf(t, next),
			Issuer: issuerOf(next), RenewWindowMS: window.Milliseconds()}
		start := time.Now()
		src.publish(stepState(t, 2, both, act))
		synctest.Wait()
		if acks, _ := f.acker.list(); len(acks) != 1 {
			t.Fatalf("acks %+v before the renewals, want distribute's only", acks)
		}
		time.Sleep(window) //nolint:forbidigo // synctest: advances the bubble's clock
		synctest.Wait()
		acks, at := f.acker.list()
		if len(acks) != 2 || acks[1].Phase != meshapi.PhaseActivate || at[1].Sub(start) >= window {
			t.Fatalf("acks %+v at %v, want activate's within %v of %v", acks, at, window, start)
		}
		for _, r := range []*rotator.Rotator{f.rot, agent} {
			if !issuedBy(currentSVID(t, r), act.Issuer) {
				t.Fatalf("%s still holds an SVID of the old issuer", r.ID())
			}
		}

		ret := &meshapi.AnchorRotation{ID: 7, Kind: meshapi.RotateRoot, Phase: meshapi.PhaseRetire, Probe: probeOf(t, next),
			Issuer: issuerOf(next)}
		src.publish(stepState(t, 3, next.Roots(), ret))
		synctest.Wait()
		if b := f.applier.bundleInForce(); len(b.X509Authorities()) != 1 || !b.HasX509Authority(next.Roots()[0]) {
			t.Fatalf("bundle in force of %d anchors after retire, want the new root only", len(b.X509Authorities()))
		}
		if r := f.caAnchors.Roots(); len(r) != 1 || !r[0].Equal(next.Roots()[0]) {
			t.Fatalf("the mesh client verifies the CA with %d anchors after retire, want the new root only", len(r))
		}
		if acks, _ := f.acker.list(); len(acks) != 3 || acks[2].Phase != meshapi.PhaseRetire {
			t.Fatalf("acks %+v, want retire's last", acks)
		}
		recs := recordsOf[audit.AnchorStep](f.audit)
		if len(recs) != 3 || recs[1].Result != audit.AnchorStepAcked || len(recs[1].Renewed) != 2 || len(recs[2].Renewed) != 0 {
			t.Fatalf("anchor step records %+v, want three acknowledged, activate's with two renewals", recs)
		}
		var m dto.Metric
		if err := f.applier.anchor.acked.WithLabelValues(string(meshapi.PhaseRetire)).Write(&m); err != nil {
			t.Fatal(err)
		}
		if got := m.GetGauge().GetValue(); got != 7 {
			t.Fatalf("acknowledged step metric %v, want rotation 7 at retire", got)
		}
	})
}

// TestAnchorStepCatchUp: a proxy back from a partition that missed distribute and
// activate and sees retire first keeps the old root while its SVID needs it, renews
// from the new issuer, then drops it.
func TestAnchorStepCatchUp(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, src := followed(t)
		old := f.ca
		src.publish(stepState(t, 1, old.Roots(), nil)) // before the partition
		synctest.Wait()
		next := testca.New(t, testca.WithTrustDomain(testHost.TrustDomain()))
		f.issuer.use(next)
		const window = time.Minute
		ret := &meshapi.AnchorRotation{ID: 3, Kind: meshapi.RotateRoot, Phase: meshapi.PhaseRetire, Probe: probeOf(t, next),
			Issuer: issuerOf(next), RenewWindowMS: window.Milliseconds()}
		src.publish(stepState(t, 2, next.Roots(), ret))
		synctest.Wait()
		if b := f.applier.bundleInForce(); !b.HasX509Authority(old.Roots()[0]) || !b.HasX509Authority(next.Roots()[0]) {
			t.Fatal("the bundle in force dropped the anchor of the SVID held, or lacks the published one")
		}
		time.Sleep(window) //nolint:forbidigo // synctest: advances the bubble's clock
		synctest.Wait()
		if b := f.applier.bundleInForce(); b.HasX509Authority(old.Roots()[0]) {
			t.Fatal("the old root is still in force after the renewal")
		}
		if acks, _ := f.acker.list(); len(acks) != 1 || acks[0].Phase != meshapi.PhaseRetire {
			t.Fatalf("acks %+v, want retire's", acks)
		}
	})
}

// TestAnchorStepProbeFailed: a probe that does not verify with the bundle in force is
// audited and never acknowledged.
func TestAnchorStepProbeFailed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, src := followed(t)
		foreign := testca.New(t, testca.WithTrustDomain(testHost.TrustDomain()))
		step := &meshapi.AnchorRotation{ID: 4, Kind: meshapi.RotateIntermediate, Phase: meshapi.PhaseDistribute,
			Probe: probeOf(t, foreign)}
		src.publish(stepState(t, 1, f.ca.Roots(), step))
		synctest.Wait()
		if acks, _ := f.acker.list(); len(acks) != 0 {
			t.Fatalf("acks %+v after a failed probe, want none", acks)
		}
		recs := recordsOf[audit.AnchorStep](f.audit)
		if len(recs) != 1 || recs[0].Result != audit.AnchorStepProbeFailed || recs[0].RotationID != 4 {
			t.Fatalf("anchor step records %+v, want one probe failure", recs)
		}
	})
}

// TestAnchorStepAck: a failed acknowledgement is retried with backoff until accepted;
// a stale answer ends the step at once, audited as refused.
func TestAnchorStepAck(t *testing.T) {
	for _, tc := range []struct {
		name     string
		fail     []error
		result   audit.AnchorStepResult
		attempts int
	}{
		{"retried until accepted", []error{errors.New("ca down"), errors.New("ca down")}, audit.AnchorStepAcked, 3},
		{"stale", []error{errStale}, audit.AnchorStepRefused, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				f, src := followed(t)
				f.acker.failNext(tc.fail...)
				step := &meshapi.AnchorRotation{ID: 5, Kind: meshapi.RotateIntermediate, Phase: meshapi.PhaseDistribute}
				src.publish(stepState(t, 1, f.ca.Roots(), step))
				time.Sleep(time.Minute) //nolint:forbidigo // synctest: advances the bubble's clock
				synctest.Wait()
				recs := recordsOf[audit.AnchorStep](f.audit)
				if len(recs) != 1 || recs[0].Result != tc.result || recs[0].Attempts != tc.attempts {
					t.Fatalf("anchor step records %+v, want one %s after %d attempts", recs, tc.result, tc.attempts)
				}
				if acks, _ := f.acker.list(); len(acks) != tc.attempts {
					t.Fatalf("%d acknowledgements sent, want %d", len(acks), tc.attempts)
				}
			})
		})
	}
}

// TestAnchorStepSuperseded: a new step cancels the previous step's pending renewal;
// only the new step is acknowledged.
func TestAnchorStepSuperseded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, src := followed(t)
		next := testca.New(t, testca.WithTrustDomain(testHost.TrustDomain()))
		both := append(f.ca.Roots(), next.Roots()...)
		act := &meshapi.AnchorRotation{ID: 8, Kind: meshapi.RotateIntermediate, Phase: meshapi.PhaseActivate,
			Issuer: issuerOf(next), RenewWindowMS: time.Hour.Milliseconds()}
		src.publish(stepState(t, 1, both, act))
		synctest.Wait()
		abort := &meshapi.AnchorRotation{ID: 8, Kind: meshapi.RotateIntermediate, Phase: meshapi.PhaseAbort,
			Issuer: issuerOf(f.ca), RenewWindowMS: time.Hour.Milliseconds()}
		src.publish(stepState(t, 2, both, abort))
		time.Sleep(time.Hour) //nolint:forbidigo // synctest: advances the bubble's clock
		synctest.Wait()
		for _, r := range recordsOf[*audit.Rotation](f.audit) {
			if r.Trigger == string(rotator.TriggerAnchor) {
				t.Fatalf("rotation %+v: want the cancelled step's renewal never made", r)
			}
		}
		if acks, _ := f.acker.list(); len(acks) != 1 || acks[0].Phase != meshapi.PhaseAbort {
			t.Fatalf("acks %+v, want abort's only", acks)
		}
	})
}

// TestAnchorStepAgentGone: an agent unregistered while its renewal waits does not hold
// the step back: the host renews and the step is acknowledged.
func TestAnchorStepAgentGone(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f, src := followed(t)
		next := testca.New(t, testca.WithTrustDomain(testHost.TrustDomain()))
		both := append(f.ca.Roots(), next.Roots()...)
		src.publish(stepState(t, 1, both, nil)) // the agent enrols from the old issuer
		synctest.Wait()
		f.issuer.use(next)
		const window = time.Minute
		act := &meshapi.AnchorRotation{ID: 6, Kind: meshapi.RotateRoot, Phase: meshapi.PhaseActivate, Probe: probeOf(t, next),
			Issuer: issuerOf(next), RenewWindowMS: window.Milliseconds()}
		src.publish(stepState(t, 2, both, act))
		synctest.Wait()
		src.publish(stateOf(t, 3, meshapi.DirectoryDocument{Bundle: meshapi.NewBundleDocument(both), AnchorRotation: act}, nil))
		time.Sleep(window) //nolint:forbidigo // synctest: advances the bubble's clock
		synctest.Wait()
		if _, ok := f.agents.lookup(planner); ok {
			t.Fatal("the unregistered agent is still held")
		}
		recs := recordsOf[audit.AnchorStep](f.audit)
		if len(recs) != 1 || recs[0].Result != audit.AnchorStepAcked || len(recs[0].Renewed) > 1 {
			t.Fatalf("anchor step records %+v, want activate acknowledged, the agent's renewal dropped", recs)
		}
	})
}
