package proxy_test

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/proxy"
)

// TestTargetHalfClosesFirst: a target that answers, half-closes and then
// keeps reading gets what the agent sends after it saw the target's EOF, on
// every transport, and the connection still ends cleanly on both sides.
func TestTargetHalfClosesFirst(t *testing.T) {
	t.Parallel()
	for _, tr := range []string{proxy.TransportTLS, proxy.TransportH2, proxy.TransportQUIC} {
		t.Run(tr, func(t *testing.T) {
			t.Parallel()
			late := make(chan string, 1)
			handle := func(c *net.TCPConn) {
				_ = c.SetDeadline(time.Now().Add(waitLimit))
				if _, err := c.Write([]byte("greeting")); err != nil {
					late <- err.Error()
					return
				}
				if err := c.CloseWrite(); err != nil {
					late <- err.Error()
					return
				}
				got, err := io.ReadAll(c)
				if err != nil {
					late <- err.Error()
					return
				}
				late <- string(got)
			}
			audited := func(c *proxy.Config) { c.StreamAudit = true }
			var m *mesh
			if tr == proxy.TransportTLS {
				m = newMeshWith(t, handle, audited)
			} else {
				m = pooledMesh(t, tr, handle, audited)
			}
			c := m.dialRoute(t)
			if got, err := io.ReadAll(c); err != nil || string(got) != "greeting" {
				t.Fatalf("read %q, %v; want the greeting, then EOF", got, err)
			}
			const reply = "sent after the target's half-close"
			if _, err := c.Write([]byte(reply)); err != nil {
				t.Fatal(err)
			}
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			select {
			case got := <-late:
				if got != reply {
					t.Fatalf("target read %q after its half-close, want %q", got, reply)
				}
			case <-time.After(waitLimit):
				t.Fatalf("target read nothing after its half-close within %s", waitLimit)
			}
			_ = c.Close()
			want := int64(len("greeting") + len(reply))
			for _, n := range []*node{m.a, m.b} {
				rec := waitFor(t, n.audit, "connection closed", func(c audit.Connection) bool { return c.Transport == tr })
				if rec.Reason != "" || rec.BytesIn+rec.BytesOut != want {
					t.Errorf("%s: record %+v, want a clean close with %d bytes", n.id, rec, want)
				}
			}
		})
	}
}
