package proxy_test

import (
	"io"
	"testing"

	"github.com/agentmesh/agentmesh/proxy"
)

// TestQUICKeyUpdateInterval: with an interval of 500 packets, 8 MiB each way
// (thousands of packets) make many key updates, where quic-go's default of
// 100 000 packets would make only the first one, after 100 packets.
func TestQUICKeyUpdateInterval(t *testing.T) {
	t.Parallel()
	m := pooledMesh(t, proxy.TransportQUIC, echo, func(c *proxy.Config) { c.QUICKeyUpdateInterval = 500 })
	const size = 8 << 20
	c := m.dialRoute(t)
	go func() {
		_, _ = c.Write(make([]byte, size))
		_ = c.CloseWrite()
	}()
	if n, err := io.Copy(io.Discard, c); err != nil || n != size {
		t.Fatalf("echo: %d bytes, %v", n, err)
	}
	var total float64
	for _, n := range []*node{m.a, m.b} {
		total += n.metric(t, "agentmesh_proxy_quic_key_updates_total", nil)
	}
	// About 12 000 packets between the two sides: at least a dozen updates.
	if total < 12 {
		t.Fatalf("quic_key_updates_total = %v across both proxies, want >= 12 with an interval of 500 packets", total)
	}
}
