package node

import (
	"errors"
	"log/slog"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/policy"
	"github.com/agentmesh/agentmesh/proxy"
	"github.com/agentmesh/agentmesh/rotator"
)

// TestAgentsReady checks that a proxy is not ready before it knows its agents, nor while
// an agent registered to its host has no identity yet; another host's agents don't count.
func TestAgentsReady(t *testing.T) {
	t.Parallel()
	host := spiffeid.RequireFromString("spiffe://td.test/host/a")
	other := spiffeid.RequireFromString("spiffe://td.test/host/b")
	planner := spiffeid.RequireFromString("spiffe://td.test/agent/planner")
	search := spiffeid.RequireFromString("spiffe://td.test/agent/search")
	newRot := func(spiffeid.ID, prometheus.Registerer, policy.RotationPolicy) (*rotator.Rotator, error) {
		return nil, errors.New("not started in this test")
	}
	tests := []struct {
		name    string
		entries []registration // nil: the directory has not answered
		want    error
	}{
		{name: "directory not answered", want: errEntriesPending},
		{name: "no agents", entries: []registration{}},
		{name: "another host's agent", entries: []registration{{ID: search, Host: other}}},
		{name: "own agent without identity", entries: []registration{{ID: search, Host: other}, {ID: planner, Host: host, UID: 1001}},
			want: errAgentPending},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			a := newAgents(host, policy.RotationPolicy{}, prometheus.NewRegistry(), func() proxy.Denier { return nil },
				slog.New(slog.DiscardHandler), newRot)
			if tc.entries != nil {
				a.update(tc.entries)
			}
			err := a.ready()
			if tc.want == nil && err != nil {
				t.Fatalf("ready() = %v, want nil", err)
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("ready() = %v, want %v", err, tc.want)
			}
		})
	}
}
