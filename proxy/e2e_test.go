package proxy_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"testing"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/proxy"
)

// TestRoundTrip sends 4 MiB through A and B to an echo target and back; the
// agent half-closes after sending, the echo half-closes after echoing.
func TestRoundTrip(t *testing.T) {
	t.Parallel()
	m := newMesh(t, echo)
	const size = 4 << 20
	payload := make([]byte, size)
	_, _ = rand.Read(payload)

	c := m.dialRoute(t)
	writeErr := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.CloseWrite()
		}
		writeErr <- err
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if err := <-writeErr; err != nil {
		t.Fatalf("write: %v", err)
	}
	if sha256.Sum256(got) != sha256.Sum256(payload) {
		t.Fatalf("echo differs: got %d bytes, sent %d", len(got), size)
	}
	_ = c.Close()

	out := waitFor(t, m.a.audit, "outbound ok", func(h audit.Handshake) bool { return h.Result == "ok" })
	in := waitFor(t, m.b.audit, "inbound ok", func(h audit.Handshake) bool { return h.Result == "ok" })
	checks := []struct {
		name string
		h    audit.Handshake
		dir  string
		peer string
		self string
	}{
		{name: "outbound_on_a", h: out, dir: "outbound", peer: idB.String(), self: idA.String()},
		{name: "inbound_on_b", h: in, dir: "inbound", peer: idA.String(), self: idB.String()},
	}
	for _, tc := range checks {
		if tc.h.Direction != tc.dir || tc.h.PeerID != tc.peer || tc.h.LocalID != tc.self ||
			tc.h.TLSVersion != "TLS 1.3" || tc.h.Cipher == "" || tc.h.PeerSerial == "" || tc.h.Transport != "tls" {
			t.Errorf("%s: handshake record %+v", tc.name, tc.h)
		}
	}

	connA := waitFor(t, m.a.audit, "closed", func(audit.Connection) bool { return true })
	connB := waitFor(t, m.b.audit, "closed", func(audit.Connection) bool { return true })
	if connA.BytesOut != size || connA.BytesIn != size || connA.Reason != "" {
		t.Errorf("A connection record %+v, want %d bytes each way and a clean close", connA, size)
	}
	if connB.BytesIn != size || connB.BytesOut != size || connB.Reason != "" {
		t.Errorf("B connection record %+v, want %d bytes each way and a clean close", connB, size)
	}
	for _, n := range []*node{m.a, m.b} {
		if got := n.metric(t, "agentmesh_proxy_bytes_total", map[string]string{"direction": "inbound"}); got != size {
			t.Errorf("%s bytes_total{inbound} = %v, want %d", n.id, got, size)
		}
		if got := n.metric(t, "agentmesh_proxy_active_connections", nil); got != 0 {
			t.Errorf("%s active_connections = %v after close", n.id, got)
		}
	}
	if got := m.a.metric(t, "agentmesh_proxy_handshakes_total", map[string]string{"direction": "outbound", "result": "ok"}); got != 1 {
		t.Errorf("A handshakes_total{outbound,ok} = %v, want 1", got)
	}
	if got := m.b.metric(t, "agentmesh_proxy_handshake_duration_seconds", map[string]string{"direction": "inbound"}); got != 1 {
		t.Errorf("B handshake_duration_seconds{inbound} count = %v, want 1", got)
	}
}

// TestHalfClose: the target only answers after it has read EOF, which it
// can only see if the agent's CloseWrite travelled as close_notify and
// became a FIN on B's side.
func TestHalfClose(t *testing.T) {
	t.Parallel()
	m := newMesh(t, func(c *net.TCPConn) {
		got, err := io.ReadAll(c)
		if err != nil {
			return
		}
		sum := sha256.Sum256(got)
		_, _ = c.Write([]byte(hex.EncodeToString(sum[:])))
		_ = c.CloseWrite()
	})
	request := []byte("everything I have to say")
	c := m.dialRoute(t)
	if _, err := c.Write(request); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	reply, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read reply after half-close: %v", err)
	}
	sum := sha256.Sum256(request)
	if want := hex.EncodeToString(sum[:]); string(reply) != want {
		t.Fatalf("reply %q, want %q", reply, want)
	}
}

// ping writes msg and reads it back through an echo mesh.
func ping(t testing.TB, c net.Conn, msg string) error {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if !bytes.Equal(buf, []byte(msg)) {
		t.Fatalf("echo %q, want %q", buf, msg)
	}
	return nil
}

// TestHotSwap rotates both proxies' SVIDs mid-run: the open connection keeps
// working on the old credentials, the next one authenticates with the new
// ones (seen by the peer, per the audit records), and CloseWhere can then
// close exactly the connections of the old certificate.
func TestHotSwap(t *testing.T) {
	t.Parallel()
	m := newMesh(t, echo)
	serial := func(n *node) string {
		cert, err := n.creds.TLSCertificate()
		if err != nil {
			t.Fatal(err)
		}
		return cert.Leaf.SerialNumber.String()
	}
	oldA, oldB := serial(m.a), serial(m.b)

	first := m.dialRoute(t)
	if err := ping(t, first, "before rotation"); err != nil {
		t.Fatal(err)
	}

	m.a.creds.Set(m.ca.SVID(t, idA))
	m.b.creds.Set(m.ca.SVID(t, idB))
	newA, newB := serial(m.a), serial(m.b)

	if err := ping(t, first, "after rotation, old connection"); err != nil {
		t.Fatalf("old connection broke on rotation: %v", err)
	}
	second := m.dialRoute(t)
	if err := ping(t, second, "after rotation, new connection"); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name      string
		n         *node
		oldSerial string
		newSerial string
	}{
		{name: "b_saw_a", n: m.b, oldSerial: oldA, newSerial: newA},
		{name: "a_saw_b", n: m.a, oldSerial: oldB, newSerial: newB},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var serials []string
			for _, h := range tc.n.audit.handshakes() {
				if h.Result == "ok" {
					serials = append(serials, h.PeerSerial)
				}
			}
			if len(serials) != 2 || serials[0] != tc.oldSerial || serials[1] != tc.newSerial {
				t.Fatalf("peer serials in ok handshakes = %v, want [%s %s]", serials, tc.oldSerial, tc.newSerial)
			}
		})
	}

	// Revocation of the old certificate, as the revocation feed will do it.
	closed := m.b.CloseWhere(func(ci proxy.ConnInfo) bool { return ci.PeerSerial == oldA })
	if closed != 1 {
		t.Fatalf("CloseWhere closed %d connections, want 1", closed)
	}
	if _, err := io.ReadAll(first); err != nil && !errors.Is(err, net.ErrClosed) {
		t.Logf("old connection ended with %v", err) // a reset is fine too
	}
	if err := ping(t, second, "still here"); err != nil {
		t.Fatalf("connection on the new certificate was closed too: %v", err)
	}
	rec := waitFor(t, m.b.audit, "closed by CloseWhere", func(c audit.Connection) bool { return c.Reason == "closed" })
	if rec.PeerID != idA.String() || rec.Direction != "inbound" {
		t.Fatalf("connection record %+v", rec)
	}
	if infos := m.b.Connections(); len(infos) != 1 || infos[0].PeerSerial != newA {
		t.Fatalf("Connections() = %+v, want only the one on serial %s", infos, newA)
	}
}

// TestShutdownClosesConnections: cancelling Run closes live connections and
// Run returns.
func TestShutdownClosesConnections(t *testing.T) {
	t.Parallel()
	m := newMesh(t, echo)
	c := m.dialRoute(t)
	if err := ping(t, c, "hello"); err != nil {
		t.Fatal(err)
	}
	m.a.stop()
	if _, err := io.ReadAll(c); err != nil {
		t.Logf("agent connection ended with %v", err)
	}
	rec := waitFor(t, m.a.audit, "closed", func(audit.Connection) bool { return true })
	if rec.Reason != "closed" {
		t.Fatalf("connection record %+v, want reason closed", rec)
	}
}
