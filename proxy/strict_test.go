package proxy_test

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/proxy"
)

// TestStrictRefusesPlaintext: a plain connection reaching the strict-mode listener gets
// not one byte, is closed, and leaves an inbound refusal in the audit log.
func TestStrictRefusesPlaintext(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	n := start(t, ca, spiffeid.RequireFromString("spiffe://example.org/host/b"), proxy.Config{Strict: "127.0.0.1:0"})
	c, err := net.Dial("tcp", n.StrictAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(waitLimit))
	_, _ = c.Write([]byte("GET / HTTP/1.1\r\n\r\n"))
	if got, _ := io.ReadAll(c); len(got) != 0 {
		t.Fatalf("strict listener answered %q", got)
	}
	rec := waitFor(t, n.audit, "strict refusal", func(h audit.Handshake) bool {
		return h.Reason == string(proxy.ReasonPlaintextRefused)
	})
	if rec.Direction != "inbound" || rec.Result != "refused" || rec.PeerAddr != c.LocalAddr().String() {
		t.Fatalf("record = %+v", rec)
	}
}
