package ca

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"
)

func TestNextFleetID(t *testing.T) {
	t.Parallel()
	now := time.Date(2030, 1, 2, 3, 4, 5, 678_901_234, time.UTC)
	us := uint64(now.UnixMicro())
	for _, tc := range []struct {
		name string
		prev uint64
		now  time.Time
		want uint64
	}{
		{"first", 0, now, us},
		{"clock past the previous", us - 1_000_000, now, us},
		{"same microsecond", us, now, us + 1},
		{"clock set back", us + 3_600_000_000, now, us + 3_600_000_001},
		{"clock at the epoch", 0, time.Unix(0, 0), 1},
		{"clock before the epoch", 7, time.Unix(-10, 0), 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := nextFleetID(tc.prev, tc.now); got != tc.want {
				t.Errorf("nextFleetID(%d, %v) = %d, want %d", tc.prev, tc.now, got, tc.want)
			}
			if got := nextFleetID(tc.prev, tc.now); got <= tc.prev {
				t.Errorf("nextFleetID(%d) = %d does not increase", tc.prev, got)
			}
		})
	}
}

func TestFleetDue(t *testing.T) {
	t.Parallel()
	created := time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)
	after, before := created.Add(time.Second), created.Add(-time.Second)
	for _, tc := range []struct {
		name     string
		seen     uint64
		fr       meshapi.FleetRotation
		wantSeen uint64
		wantCall bool
	}{
		{"first, after start", 0, meshapi.FleetRotation{ID: 10, At: after}, 10, true},
		{"first, before start", 0, meshapi.FleetRotation{ID: 10, At: before}, 10, false},
		{"requested at the start instant", 0, meshapi.FleetRotation{ID: 10, At: created}, 10, false},
		{"newer", 10, meshapi.FleetRotation{ID: 11, At: after}, 11, true},
		{"same again", 10, meshapi.FleetRotation{ID: 10, At: after}, 10, false},
		{"older (replayed answer)", 10, meshapi.FleetRotation{ID: 9, At: after.Add(time.Hour)}, 10, false},
		{"newer but before start", 10, meshapi.FleetRotation{ID: 11, At: before}, 11, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			seen, call := meshapi.FleetDue(tc.seen, created, tc.fr)
			if seen != tc.wantSeen || call != tc.wantCall {
				t.Errorf("meshapi.FleetDue(%d, %+v) = %d, %v; want %d, %v", tc.seen, tc.fr, seen, call, tc.wantSeen, tc.wantCall)
			}
		})
	}
}

// fleetWatcher runs a watch-only Member for svid and follows its fleet rotations.
func fleetWatcher(t *testing.T, ca *runningCA, svid *x509svid.SVID) (*meshclient.Member, *stateFollower) {
	t.Helper()
	logger, _ := newTestLogger(t)
	cert := tlsCert(svid)
	created := time.Now()
	d, err := meshclient.NewMember(meshclient.Config{
		URL:         ca.URL(),
		Roots:       ca.Roots(),
		Certificate: func() (*tls.Certificate, error) { return cert, nil },
		Logger:      logger.With("proxy", svid.ID.String()),
	})
	if err != nil {
		t.Fatal(err)
	}
	runDirectory(t, d)
	return d, newStateFollower(d.Watch, created)
}

func sameFleet(a, b meshapi.FleetRotation) bool {
	return a.ID == b.ID && a.At.Equal(b.At) && a.Reason == b.Reason
}

func (r *auditRecorder) rotations() []audit.Rotation {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []audit.Rotation
	for _, e := range r.events {
		if rot, ok := e.(audit.Rotation); ok {
			out = append(out, rot)
		}
	}
	return out
}

// A fleet rotation requested on the admin socket reaches a watching proxy at once
// (its parked long-poll wakes), exactly once; a proxy started afterwards does not act
// on it but does on the next one; the request is audited and in the directory.
func TestFleetRotation(t *testing.T) {
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	cfg.Audit = rec
	parked := make(chan struct{}, 1)
	ca := startCAWith(t, cfg, parkedHook(parked))
	ctx := context.Background()

	early, earlyGot := fleetWatcher(t, ca, enroll(t, ca, spiffeid.RequireFromPath(testTD, "/host/early")))
	waitUntil(t, early, "first directory", func() bool { return early.Watch.State().Version() != 0 })
	select {
	case <-parked: // the watcher's next long-poll is waiting on the CA
	case <-time.After(10 * time.Second):
		t.Fatal("no long-poll parked")
	}
	before, err := RequestDirectory(ctx, cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	if before.Rotation != nil {
		t.Fatalf("rotation %+v before any request", before.Rotation)
	}

	fr, err := RequestFleetRotation(ctx, cfg.StateDir, "quarterly key rotation")
	if err != nil {
		t.Fatalf("RequestFleetRotation: %v", err)
	}
	if fr.ID == 0 || fr.Reason != "quarterly key rotation" || time.Since(fr.At) > time.Minute {
		t.Errorf("fleet rotation %+v", fr)
	}
	if got := nextFleet(t, earlyGot); !sameFleet(got, *fr) {
		t.Errorf("fleet rotation due %+v, want %+v", got, *fr)
	}
	doc, err := RequestDirectory(ctx, cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	if doc.Rotation == nil || !sameFleet(*doc.Rotation, *fr) || doc.Version <= before.Version {
		t.Errorf("directory after the request: version %d (was %d), rotation %+v", doc.Version, before.Version, doc.Rotation)
	}
	recs := rec.rotations()
	want := audit.Rotation{SPIFFEID: "*", Trigger: "fleet", Actor: audit.PeerUIDActor(os.Getuid()),
		Reason: "quarterly key rotation", Result: "ok"}
	if len(recs) != 1 {
		t.Fatalf("audit rotation records %+v, want one", recs)
	}
	if r := recs[0]; r.SPIFFEID != want.SPIFFEID || r.Trigger != want.Trigger || r.Initiator != want.Initiator ||
		r.Reason != want.Reason || r.Result != want.Result || r.Started.IsZero() || r.Finished.Before(r.Started) {
		t.Errorf("audit record %+v, want %+v", r, want)
	}

	// The next directory version carries the same rotation again: no second call.
	if _, err := ca.Revoke(ctx, audit.Actor{Initiator: "op"}, meshapi.RevokeRequest{SPIFFEID: "spiffe://mesh.test/host/gone", Reason: "r"}); err != nil {
		t.Fatal(err)
	}
	afterRevoke, err := RequestDirectory(ctx, cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, early, "directory after the revocation", func() bool { return early.Watch.State().Version() >= afterRevoke.Version })
	noFleet(t, earlyGot, "the same rotation in a later directory version")

	late, lateGot := fleetWatcher(t, ca, enroll(t, ca, spiffeid.RequireFromPath(testTD, "/host/late")))
	waitUntil(t, late, "first directory of the late client", func() bool { return late.Watch.State().Version() >= afterRevoke.Version })
	noFleet(t, lateGot, "a client created after the request")

	var re *meshapi.ResponseError
	if _, err := RequestFleetRotation(ctx, cfg.StateDir, "bad\nreason"); !errors.As(err, &re) || re.Status != http.StatusBadRequest {
		t.Errorf("RequestFleetRotation with a control character: %v, want 400", err)
	}
	if n := len(rec.rotations()); n != 1 {
		t.Errorf("%d audit rotation records after a refused request, want 1", n)
	}

	second, err := RequestFleetRotation(ctx, cfg.StateDir, "")
	if err != nil {
		t.Fatal(err)
	}
	if second.ID <= fr.ID {
		t.Errorf("second ID %d not above the first %d", second.ID, fr.ID)
	}
	for name, ch := range map[string]*stateFollower{"early": earlyGot, "late": lateGot} {
		if got := nextFleet(t, ch); !sameFleet(got, *second) {
			t.Errorf("%s client: fleet rotation due %+v, want %+v", name, got, *second)
		}
		noFleet(t, ch, name+" client after the second request")
	}
}

// IDs keep increasing across restarts, even with the clock behind the last ID: the
// latest rotation is persisted, served again after a restart, and is the floor of the
// next ID. A corrupt record stops New.
func TestFleetRotationSurvivesRestart(t *testing.T) {
	cfg, _ := testConfig(t)
	ctx := context.Background()
	first := startCA(t, cfg)
	fr1, err := first.RotateFleet(ctx, audit.Actor{Initiator: "op"}, "r1")
	if err != nil {
		t.Fatal(err)
	}
	if err := first.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}

	second := startCA(t, cfg)
	doc, err := RequestDirectory(ctx, cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	if doc.Rotation == nil || !sameFleet(*doc.Rotation, *fr1) {
		t.Fatalf("rotation after restart %+v, want %+v", doc.Rotation, fr1)
	}
	fr2, err := RequestFleetRotation(ctx, cfg.StateDir, "r2")
	if err != nil {
		t.Fatal(err)
	}
	if fr2.ID <= fr1.ID {
		t.Errorf("ID after restart %d, not above %d", fr2.ID, fr1.ID)
	}
	if err := second.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}

	// As if the clock had been set back a day since the last request.
	path := filepath.Join(cfg.StateDir, fileFleetRotation)
	ahead := meshapi.FleetRotation{ID: uint64(time.Now().Add(24 * time.Hour).UnixMicro()), At: time.Now().UTC(), Reason: "r3"}
	b, err := json.Marshal(ahead)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	third := startCA(t, cfg)
	fr4, err := third.RotateFleet(ctx, audit.Actor{Initiator: "op"}, "r4")
	if err != nil {
		t.Fatal(err)
	}
	if fr4.ID != ahead.ID+1 {
		t.Errorf("ID with the clock behind the persisted one: %d, want %d", fr4.ID, ahead.ID+1)
	}
	if err := third.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}

	if err := os.WriteFile(path, []byte(`{"id":0,"at":"2030-01-01T00:00:00Z"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if srv, err := New(ctx, cfg); err == nil {
		_ = srv.Close()
		t.Error("New with a corrupt fleet rotation record succeeded")
	}
}
