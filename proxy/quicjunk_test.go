package proxy_test

import (
	"encoding/binary"
	"net"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/proxy"
)

// TestQUICJunk: datagrams on the quic port that quic-go drops before any connection
// exists are refusals before authentication: counted in connections_refused_total and
// aggregated into refusals records, non-QUIC ones under their source address, the
// others (whose address quic-go does not report) under the source "unknown".
func TestQUICJunk(t *testing.T) {
	t.Parallel()
	n := start(t, testca.New(t), idB, proxy.Config{
		Transports: []string{proxy.TransportQUIC, proxy.TransportTLS},
		// quic-go gives up on a silent handshake after half of it.
		HandshakeTimeout: 2 * time.Second,
	})
	port := n.TunnelAddr().(*net.TCPAddr).Port
	u, err := net.DialUDP("udp", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = u.Close() }()

	const each = 10
	// Long headers: flags, version, DCID and SCID of 8 bytes.
	long := func(version uint32, size int) []byte {
		b := make([]byte, size)
		b[0] = 0xc0
		binary.BigEndian.PutUint32(b[1:], version)
		b[5], b[14] = 8, 8
		return b
	}
	attributed := [][]byte{
		[]byte("\x00not quic at all"), // first two bits clear
	}
	unattributed := [][]byte{
		long(0x1a2a3a4a, 1200), // another version: answered with Version Negotiation
		long(1, 100),           // an Initial shorter than 1,200 bytes
		append([]byte{0x40}, make([]byte, 40)...),                // a short header for no connection
		{0xc0, 0, 0, 0, 1, 0xff},                                 // a long header cut short
		append(long(1, 1200)[:15], 0xe0),                         // broken connection ID lengths
		append([]byte{0xe0, 0, 0, 0, 1, 8}, make([]byte, 60)...), // a Handshake packet for no connection
	}
	for range each {
		for _, d := range append(attributed, unattributed...) {
			if _, err := u.Write(d); err != nil {
				t.Fatal(err)
			}
		}
	}
	// A well-formed Initial whose payload does not decrypt: a connection that never
	// reads a ClientHello, refused when its handshake times out.
	initial := long(1, 1200)
	initial[23] = 0                                            // no token
	binary.BigEndian.PutUint16(initial[24:], 0x4000|(1200-26)) // the payload's length
	if _, err := u.Write(initial); err != nil {
		t.Fatal(err)
	}
	wantKnown := uint64(each * len(attributed))
	wantUnknown := uint64(each * len(unattributed))

	// Sum the refusals records until both sources have their count.
	deadline := time.NewTimer(waitLimit)
	defer deadline.Stop()
	var known, unknown, timeouts uint64
	for {
		known, unknown, timeouts = 0, 0, 0
		for _, e := range n.audit.snapshot() {
			r, ok := e.(audit.Refusals)
			if !ok {
				continue
			}
			if r.Transports["quic"] != r.Count {
				t.Fatalf("refusals record %+v: want only quic", r)
			}
			switch r.Source {
			case "127.0.0.1":
				known += r.Reasons[string(proxy.ReasonQUICInvalid)]
				timeouts += r.Reasons[string(proxy.ReasonTimeout)]
			case "unknown":
				unknown += r.Reasons[string(proxy.ReasonQUICInvalid)]
			default:
				t.Fatalf("refusals record from %q", r.Source)
			}
		}
		if known >= wantKnown && unknown >= wantUnknown && timeouts >= 1 {
			break
		}
		select {
		case <-n.audit.notify:
		case <-deadline.C:
			t.Fatalf("after %s: %d refused datagrams from 127.0.0.1 (want %d), %d from unknown (want %d), %d handshakes timed out (want 1)",
				waitLimit, known, wantKnown, unknown, wantUnknown, timeouts)
		}
	}
	if known != wantKnown || unknown != wantUnknown || timeouts != 1 {
		t.Errorf("%d refused datagrams from 127.0.0.1 (want %d), %d from unknown (want %d), %d handshakes timed out (want 1)",
			known, wantKnown, unknown, wantUnknown, timeouts)
	}
	if got := n.metric(t, "agentmesh_proxy_connections_refused_total", map[string]string{"reason": string(proxy.ReasonQUICInvalid)}); got != float64(wantKnown+wantUnknown) {
		t.Errorf("connections_refused_total{reason=quic_invalid} = %v, want %d", got, wantKnown+wantUnknown)
	}
	if hs := n.audit.handshakes(); len(hs) != 0 {
		t.Errorf("handshake records %+v for junk", hs)
	}
}
