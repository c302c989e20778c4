package proxy_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/proxy"
)

// keyStates returns n's ticket key_state records in short form, in order:
// "v2 active->overlap schedule".
func keyStates(t testing.TB, n *node) []string {
	t.Helper()
	var out []string
	for _, e := range n.audit.snapshot() {
		r, ok := e.(audit.KeyState)
		if !ok {
			continue
		}
		if r.Key != "ticket" || r.SPIFFEID != "" || r.Serial != "" {
			t.Errorf("ticket key record %+v names a key other than a ticket key", r)
		}
		out = append(out, fmt.Sprintf("v%d %s->%s %s", r.Version, r.From, r.To, r.Cause))
	}
	return out
}

// TestTicketKeyStates follows B's ticket keys over two periods and a reset:
// each transition is one key_state record, in order, and TicketKeys reports
// the versions, states and bounds in force.
func TestTicketKeyStates(t *testing.T) {
	t.Parallel()
	const period = time.Minute
	clk := newClock()
	t0 := clk.Now() // B's first key is made in New
	m := newMeshWith(t, echo, func(c *proxy.Config) {
		c.TicketKeyPeriod = period
		c.Now = clk.Now
	})
	type status = proxy.TicketKeyStatus
	steps := []struct {
		name    string
		advance time.Duration
		reset   string // ResetTicketKeys cause, instead of a connection
		records []string
		keys    []status
	}{
		{
			name:    "first_key",
			records: []string{"v1 ->active schedule"},
			keys: []status{
				{Version: 1, State: "active", Created: t0, EncryptUntil: t0.Add(period), DecryptUntil: t0.Add(2 * period)},
			},
		},
		{
			name: "one_period", advance: period + time.Second,
			records: []string{"v2 ->active schedule", "v1 active->overlap schedule"},
			keys: []status{
				{Version: 2, State: "active", Created: t0.Add(61 * time.Second),
					EncryptUntil: t0.Add(121 * time.Second), DecryptUntil: t0.Add(181 * time.Second)},
				{Version: 1, State: "overlap", Created: t0,
					EncryptUntil: t0.Add(61 * time.Second), DecryptUntil: t0.Add(2 * period)},
			},
		},
		{
			name: "two_periods", advance: period + time.Second,
			records: []string{"v3 ->active schedule", "v2 active->overlap schedule", "v1 overlap->destroyed schedule"},
			keys: []status{
				{Version: 3, State: "active", Created: t0.Add(122 * time.Second),
					EncryptUntil: t0.Add(182 * time.Second), DecryptUntil: t0.Add(242 * time.Second)},
				{Version: 2, State: "overlap", Created: t0.Add(61 * time.Second),
					EncryptUntil: t0.Add(122 * time.Second), DecryptUntil: t0.Add(181 * time.Second)},
			},
		},
		{
			name: "reset", reset: "compromise",
			records: []string{"v3 active->destroyed compromise", "v2 overlap->destroyed compromise", "v4 ->active compromise"},
			keys: []status{
				{Version: 4, State: "active", Created: t0.Add(122 * time.Second),
					EncryptUntil: t0.Add(182 * time.Second), DecryptUntil: t0.Add(242 * time.Second)},
			},
		},
	}
	var want []string
	for _, s := range steps {
		clk.Advance(s.advance)
		if s.reset != "" {
			m.b.ResetTicketKeys(s.reset)
		} else {
			// A ticket use applies the schedule.
			_ = m.connect(t, s.name).Close()
		}
		want = append(want, s.records...)
		if got := keyStates(t, m.b); !slices.Equal(got, want) {
			t.Fatalf("%s: key_state records\n%q\nwant\n%q", s.name, got, want)
		}
		if got := m.b.TicketKeys(); !slices.EqualFunc(got, s.keys, equalStatus) {
			t.Fatalf("%s: TicketKeys() = %+v, want %+v", s.name, got, s.keys)
		}
	}
	for trigger, want := range map[string]float64{"period": 2, "compromise": 1, "deny_list": 0} {
		labels := map[string]string{"trigger": trigger}
		if got := m.b.metric(t, "agentmesh_proxy_ticket_key_rotations_total", labels); got != want {
			t.Errorf("ticket_key_rotations_total%v = %v, want %v", labels, got, want)
		}
	}
}

func equalStatus(a, b proxy.TicketKeyStatus) bool {
	return a.Version == b.Version && a.State == b.State && a.Created.Equal(b.Created) &&
		a.EncryptUntil.Equal(b.EncryptUntil) && a.DecryptUntil.Equal(b.DecryptUntil)
}

// TestResetTicketKeys: a session established before ResetTicketKeys does
// not resume after it, whether the proxy holds the ticket keys (server) or
// the session cache (client), and the reset counts under its cause.
func TestResetTicketKeys(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		holder func(*mesh) *node
	}{
		{name: "server_keys", holder: func(m *mesh) *node { return m.b }},
		{name: "client_caches", holder: func(m *mesh) *node { return m.a }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			m := newMesh(t, echo)
			n := tc.holder(m)
			_ = m.connect(t, "full").Close()
			from := n.audit.len()
			_ = m.connect(t, "resumed").Close()
			if h := nextHandshake(t, n, from); !h.Resumed {
				t.Fatalf("second tunnel did not resume: %+v", h)
			}
			n.ResetTicketKeys("policy")
			from = n.audit.len()
			_ = m.connect(t, "after the reset").Close()
			if h := nextHandshake(t, n, from); h.Result != "ok" || h.Resumed {
				t.Fatalf("record %+v, want ok and not resumed", h)
			}
			labels := map[string]string{"trigger": "policy"}
			if got := n.metric(t, "agentmesh_proxy_ticket_key_rotations_total", labels); got != 1 {
				t.Errorf("ticket_key_rotations_total%v = %v, want 1", labels, got)
			}
		})
	}
}
