package proxy_test

import (
	"io"
	"net"
	"testing"
)

// BenchmarkNewConnection is one agent connection through a proxy pair on loopback
// (connect, one byte each way, close): a full mutual TLS 1.3 handshake between the
// proxies, or a resumed one. Both include verification, auditing and metrics.
//
//	go test -run '^$' -bench NewConnection -benchtime 2000x ./proxy/
func BenchmarkNewConnection(b *testing.B) {
	for _, mode := range []string{"full", "resumed"} {
		b.Run(mode, func(b *testing.B) {
			m := newMesh(b, echo)
			roundTrip(b, m) // a ticket for the resumed runs
			buf := make([]byte, 1)
			b.ResetTimer()
			for b.Loop() {
				if mode == "full" {
					b.StopTimer()
					m.a.ResetTicketKeys("benchmark") // empties A's session cache
					b.StartTimer()
				}
				roundTrip(b, m, buf...)
			}
		})
	}
}

func roundTrip(b *testing.B, m *mesh, buf ...byte) {
	b.Helper()
	if len(buf) == 0 {
		buf = make([]byte, 1)
	}
	c, err := net.Dial("tcp", m.a.RouteAddr(0).String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(buf); err != nil {
		b.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil {
		b.Fatal(err)
	}
}
