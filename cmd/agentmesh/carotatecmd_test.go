package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/meshapi"
)

// The human status names the phase, the time in it, and every proxy that has not
// acknowledged with its last heartbeat; acknowledged and excluded ones are not listed.
func TestPrintRotation(t *testing.T) {
	t.Parallel()
	td := spiffeid.RequireTrustDomainFromString("mesh.test")
	a, b, c := spiffeid.RequireFromPath(td, "/host/a"), spiffeid.RequireFromPath(td, "/host/b"), spiffeid.RequireFromPath(td, "/host/c")
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	st := &meshapi.RotationStatus{ID: 7, Kind: meshapi.RotateRoot, Phase: meshapi.PhaseDistribute, PhaseMS: 90_000,
		Waiting: "acknowledgements of distribute from 1 proxies",
		Members: []meshapi.RotationMember{
			{ID: a, Acked: meshapi.PhaseDistribute, Live: true},
			{ID: b, LastHeartbeat: now.Add(-2 * time.Minute)},
			{ID: c, Excluded: true},
		},
		Missing: []spiffeid.ID{b}}
	var out bytes.Buffer
	if err := printRotation(&out, st, now); err != nil {
		t.Fatal(err)
	}
	got := out.String()
	for _, want := range []string{"phase distribute for 1m30s", "waiting for acknowledgements",
		"missing  spiffe://mesh.test/host/b  down  last heartbeat 2026-01-01T11:58:00Z (2m0s ago)"} {
		if !strings.Contains(got, want) {
			t.Errorf("status lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "host/a") || strings.Contains(got, "host/c") {
		t.Errorf("status lists an acknowledged or excluded proxy:\n%s", got)
	}
}
