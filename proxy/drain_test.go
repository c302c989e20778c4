package proxy_test

import (
	"context"
	"io"
	"net"
	"testing"
	"testing/synctest"
	"time"

	"github.com/agentmesh/agentmesh/audit"
)

// endCleanly ends an agent connection from the agent's side the polite
// way (half-close, read the rest), so every hop sees a clean EOF.
func endCleanly(t testing.TB, c *net.TCPConn) {
	t.Helper()
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(c); err != nil {
		t.Fatalf("ending a connection cleanly: %v", err)
	}
	_ = c.Close()
}

// TestDrain: after a rotation, Drain of the old serial closes, once the
// grace has passed, the connection still on the old credential (audited
// "drained", counted), leaves alone the one that ended within the grace and
// the one on the new credential; in both directions. The grace runs on the
// synctest clock, which stands still while the test waits on real sockets,
// so "within the grace" holds however slow the machine is.
func TestDrain(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		holder func(*mesh) *node // the proxy whose credential rotates
		dir    string
	}{
		{name: "inbound", holder: func(m *mesh) *node { return m.b }, dir: "inbound"},
		{name: "outbound", holder: func(m *mesh) *node { return m.a }, dir: "outbound"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			m := newMesh(t, echo)
			n := tc.holder(m)
			oldSerial := n.serial(t)
			stays := m.connect(t, "stays on the old credential")
			ends := m.connect(t, "ends within the grace")

			n.creds.Set(m.ca.SVID(t, n.id))
			newSerial := n.serial(t)
			from := n.audit.len()
			fresh := m.connect(t, "on the new credential")
			// The old credential's ticket (inbound) or session cache
			// (outbound) does not resume: the new certificate is used.
			if h := nextHandshake(t, n, from); h.LocalSerial != newSerial || h.Resumed {
				t.Fatalf("handshake after the rotation %+v, want a full one on serial %s", h, newSerial)
			}

			from = n.audit.len()
			var closed int
			synctest.Test(t, func(t *testing.T) {
				done := make(chan struct{})
				go func() {
					closed = n.Drain(t.Context(), oldSerial, time.Minute)
					close(done)
				}()
				synctest.Wait() // Drain is waiting out the grace
				endCleanly(t, ends)
				waitForFrom(t, n.audit, from, "the connection that ended within the grace",
					func(c audit.Connection) bool { return c.LocalSerial == oldSerial })
				<-done // only now does the bubble's clock move: the grace ends
			})
			if closed != 1 {
				t.Fatalf("Drain closed %d connections, want 1", closed)
			}
			if _, err := io.ReadAll(stays); err != nil {
				t.Logf("drained agent connection ended with %v", err) // a reset is fine too
			}
			waitForFrom(t, n.audit, from, "drained", func(c audit.Connection) bool { return c.Reason == "drained" })
			var reasons []string
			for _, e := range n.audit.snapshot()[from:] {
				c, ok := e.(audit.Connection)
				if !ok {
					continue
				}
				if c.LocalSerial != oldSerial || c.Direction != tc.dir {
					t.Errorf("connection record %+v, want %s on serial %s", c, tc.dir, oldSerial)
				}
				reasons = append(reasons, c.Reason)
			}
			if len(reasons) != 2 || reasons[0] != "" || reasons[1] != "drained" {
				t.Errorf("close reasons %q, want [\"\" drained]", reasons)
			}
			labels := map[string]string{"direction": tc.dir}
			if got := n.metric(t, "agentmesh_proxy_connections_drained_total", labels); got != 1 {
				t.Errorf("connections_drained_total%v = %v, want 1", labels, got)
			}
			if err := ping(t, fresh, "untouched"); err != nil {
				t.Fatalf("connection on the new credential: %v", err)
			}
			if infos := n.Connections(); len(infos) != 1 || infos[0].LocalSerial != newSerial {
				t.Fatalf("Connections() = %+v, want only the one on serial %s", infos, newSerial)
			}
		})
	}
}

// TestDrainContext: when ctx ends before the grace, Drain closes the
// remaining connections at once and returns.
func TestDrainContext(t *testing.T) {
	t.Parallel()
	m := newMesh(t, echo)
	oldSerial := m.b.serial(t)
	c := m.connect(t, "old credential")
	m.b.creds.Set(m.ca.SVID(t, idB))

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan int, 1)
	go func() { done <- m.b.Drain(ctx, oldSerial, time.Hour) }()
	if err := ping(t, c, "still open during the grace"); err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case closed := <-done:
		if closed != 1 {
			t.Fatalf("Drain closed %d connections, want 1", closed)
		}
	case <-time.After(waitLimit):
		t.Fatalf("Drain did not return within %s of its context ending", waitLimit)
	}
	rec := waitFor(t, m.b.audit, "drained", func(c audit.Connection) bool { return c.Reason == "drained" })
	if rec.LocalSerial != oldSerial || rec.PeerID != idA.String() {
		t.Errorf("connection record %+v", rec)
	}
}

// TestDrainLateRegistration: a setup that picked the old certificate
// before the rotation and registers its connection only after Drain has
// walked the registry is closed as it registers (audited "drained"), so
// a drained credential carries nothing afterwards.
func TestDrainLateRegistration(t *testing.T) {
	t.Parallel()
	m := newMesh(t, echo)
	oldSerial := m.b.serial(t)
	// B stops between recording the handshake and registering the
	// connection.
	held, release := m.b.audit.hold(t, func(e audit.Event) bool {
		h, ok := e.(audit.Handshake)
		return ok && h.Result == "ok"
	})
	c := m.dialRoute(t)
	select {
	case <-held:
	case <-time.After(waitLimit):
		t.Fatal("B recorded no handshake")
	}
	m.b.creds.Set(m.ca.SVID(t, idB))
	if closed := m.b.Drain(t.Context(), oldSerial, 0); closed != 0 {
		t.Fatalf("Drain closed %d connections before any was registered", closed)
	}
	release()

	rec := waitFor(t, m.b.audit, "drained", func(c audit.Connection) bool { return c.Reason == "drained" })
	if rec.LocalSerial != oldSerial {
		t.Errorf("connection record %+v, want local serial %s", rec, oldSerial)
	}
	if got := m.b.metric(t, "agentmesh_proxy_connections_drained_total", map[string]string{"direction": "inbound"}); got != 1 {
		t.Errorf("connections_drained_total{inbound} = %v, want 1", got)
	}
	if _, err := io.ReadAll(c); err != nil {
		t.Logf("agent connection ended with %v", err)
	}
	from := m.b.audit.len()
	_ = m.connect(t, "on the new credential").Close()
	if h := nextHandshake(t, m.b, from); h.Result != "ok" || h.LocalSerial == oldSerial {
		t.Fatalf("handshake after the drain %+v", h)
	}
}
