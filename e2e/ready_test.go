package e2e

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestReadyzCountsAgents checks that a proxy is ready only while every agent the directory
// registers to its host holds an SVID, not just the host: once an agent's identity is
// revoked (so it cannot enrol again) /readyz answers 503 naming it, and `agentmesh status
// --json` says the same; once reinstated the agent enrols and the proxy is ready again.
func TestReadyzCountsAgents(t *testing.T) {
	requireE2E(t)
	authority := startCA(t, 2*time.Minute)
	a := startProxy(t, authority, "a", nil, nil, "rotation:\n  retry_max: 2s\n")
	awaitReady(t, a, time.Minute)

	agent := "spiffe://" + trustDomain + "/agent/blocked"
	if out, errOut, err := runCmd(t.Context(), "register", agent, "--host", a.id, "--uid", "4343",
		"--state", authority.state); err != nil {
		t.Fatalf("register %s: %v\n%s%s", agent, err, out, errOut)
	}
	awaitIdentities(t, a, time.Minute)
	if out, errOut, err := runCmd(t.Context(), "revoke", "--state", authority.state, agent, "--reason", "e2e"); err != nil {
		t.Fatalf("revoke %s: %v\n%s%s", agent, err, out, errOut)
	}
	// The proxy drops the agent's SVID and cannot enrol it again.
	awaitStatus(t, a, time.Minute, func(ids map[string]identityStatus) bool {
		id, ok := ids[agent]
		return ok && !id.Ready
	})
	ready, why, err := proxyReadiness(t.Context(), a)
	if err != nil || ready || !strings.Contains(why, agent) {
		t.Errorf("status --json with the agent not enrolled: ready=%t not_ready=%q (%v), want not ready naming %s", ready, why, err, agent)
	}
	if code := readyz(t, a); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz answered %d while the agent %s has no SVID, want 503", code, agent)
	}

	if out, errOut, err := runCmd(t.Context(), "reinstate", "--state", authority.state, agent, "--reason", "e2e"); err != nil {
		t.Fatalf("reinstate %s: %v\n%s%s", agent, err, out, errOut)
	}
	awaitReady(t, a, time.Minute)
	if ids, err := proxyStatus(t.Context(), a); err != nil || !ids[agent].Ready {
		t.Errorf("/readyz 200 while the agent's identity is not ready: %+v (%v)", ids[agent], err)
	}
	if ready, why, err := proxyReadiness(t.Context(), a); err != nil || !ready {
		t.Errorf("status --json once /readyz is 200: ready=%t not_ready=%q (%v), want ready", ready, why, err)
	}
}

// proxyReadiness returns the readiness `agentmesh status --json` of p reports, and why not.
func proxyReadiness(ctx context.Context, p *meshProxy) (bool, string, error) {
	var doc struct {
		Ready    bool   `json:"ready"`
		NotReady string `json:"not_ready"`
	}
	err := statusJSON(ctx, p, &doc)
	return doc.Ready, doc.NotReady, err
}
