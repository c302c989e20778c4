package ca

import (
	"context"
	"log/slog"
	"path/filepath"
	"testing"
	"testing/synctest"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/ca/authority"
	"github.com/agentmesh/agentmesh/meshapi"
)

// The driver under synctest: a rotation in activate, every member acknowledged, holds
// until what the old key issued has expired (activation + lifetime + backdate), then
// enters retire on the next tick by itself, and publishes the retire step; an
// acknowledgement wakes it at once rather than on the tick.
func TestAnchorLoopGates(t *testing.T) {
	requireSoftHSM(t)
	dir := filepath.Join(t.TempDir(), "state")
	cfg := Config{StateDir: dir, TrustDomain: testTD, SVIDLifetime: time.Minute}.withDefaults()
	if err := prepareStateDir(dir, cfg.Logger); err != nil {
		t.Fatal(err)
	}
	auth, err := authority.Open(context.Background(), authority.Config{TrustDomain: testTD, StateDir: dir,
		SVIDLifetime: cfg.SVIDLifetime, Backdate: backdate(cfg.SVIDLifetime), TokenLifetime: time.Minute,
		Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatalf("open authority: %v", err)
	}
	t.Cleanup(func() { _ = auth.Close(nil) })
	if _, err := auth.Prepare(meshapi.RotateIntermediate); err != nil {
		t.Fatalf("prepare: %v", err)
	}
	if err := auth.Activate(); err != nil {
		t.Fatalf("activate: %v", err)
	}
	hostA := spiffeid.RequireFromPath(testTD, "/host/a")

	synctest.Test(t, func(t *testing.T) {
		now := time.Now()
		s := &Server{cfg: cfg, log: cfg.Logger, dir: newRegistry(cfg.DirectoryTTL, cfg.Logger, now)}
		s.anchor.auth, s.anchor.metrics, s.anchor.wake = auth, newAnchorMetrics(), make(chan struct{}, 1)
		s.anchor.applied = true
		s.anchor.rec = &anchorRecord{ID: 1, Kind: meshapi.RotateIntermediate, Phase: meshapi.PhaseActivate,
			Started: now, Since: now, Activated: now, Published: []string{"v"}, Bundle: "v",
			Members: []anchorMember{{ID: hostA, Acked: meshapi.PhaseActivate}}}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go s.anchorLoop(ctx)

		drained := cfg.SVIDLifetime + backdate(cfg.SVIDLifetime)
		time.Sleep(drained - time.Millisecond) //nolint:forbidigo // synctest: advances the bubble's clock
		synctest.Wait()
		if st := s.AnchorRotationStatus(); st.Phase != meshapi.PhaseActivate {
			t.Fatalf("phase %s before the old key's certificates expired", st.Phase)
		}
		time.Sleep(anchorTick) //nolint:forbidigo // synctest: advances the bubble's clock
		synctest.Wait()
		st := s.AnchorRotationStatus()
		if st.Phase != meshapi.PhaseRetire || len(st.Missing) != 1 {
			t.Fatalf("after expiry: phase %s missing %v, want retire waiting for a", st.Phase, st.Missing)
		}
		step := s.dir.snapshot(time.Now()).AnchorRotation
		if step == nil || step.Phase != meshapi.PhaseRetire {
			t.Fatalf("directory step %+v", step)
		}

		// The acknowledgement wakes the driver: destroy and done follow without a tick.
		if _, _, _, err := s.ackAnchor(hostA, auth.Active().Intermediate, ackOf(step), audit.CARotation{}, time.Now()); err != nil {
			t.Fatalf("ack retire: %v", err)
		}
		start := time.Now()
		synctest.Wait()
		if st := s.AnchorRotationStatus(); st.Phase != meshapi.PhaseDone || time.Since(start) != 0 {
			t.Fatalf("phase %s after %v, want done at once", st.Phase, time.Since(start))
		}
	})
}
