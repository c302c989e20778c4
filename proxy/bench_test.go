package proxy_test

import (
	"io"
	"net"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/internal/sockowner"
	"github.com/agentmesh/agentmesh/internal/testaudit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/proxy"
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

// BenchmarkTransport compares the transports on loopback, through a proxy
// pair to an echo target: a new agent connection per operation (serially and
// 16 at a time), and bulk throughput of one connection (8 MiB up and back
// per operation). tls makes full handshakes (DisableResumption) or resumes;
// h2 and quic open a stream on a pooled connection.
//
//	go test -run '^$' -bench Transport -benchtime 2s ./proxy/
func BenchmarkTransport(b *testing.B) {
	modes := []struct {
		name      string
		transport string
		noResume  bool
	}{
		{name: "tls_full", transport: proxy.TransportTLS, noResume: true},
		{name: "tls_resumed", transport: proxy.TransportTLS},
	}
	for _, tr := range pooledTransports {
		modes = append(modes, struct {
			name      string
			transport string
			noResume  bool
		}{name: tr, transport: tr})
	}
	for _, mode := range modes {
		mesh := func(b *testing.B) *mesh {
			return newMeshWith(b, echo, func(c *proxy.Config) {
				c.Transports = []string{mode.transport}
				c.DisableResumption = mode.noResume
				for i := range c.Routes {
					c.Routes[i].Transport = mode.transport
				}
			})
		}
		b.Run("new_connection/"+mode.name, func(b *testing.B) {
			m := mesh(b)
			roundTrip(b, m)
			for b.Loop() {
				roundTrip(b, m)
			}
		})
		b.Run("new_connection_c16/"+mode.name, func(b *testing.B) {
			m := mesh(b)
			roundTrip(b, m)
			b.SetParallelism(16 / max(1, runtime.GOMAXPROCS(0)))
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					roundTrip(b, m)
				}
			})
		})
		b.Run("bulk/"+mode.name, func(b *testing.B) {
			m := mesh(b)
			const chunk = 8 << 20
			buf := make([]byte, chunk)
			c, err := net.Dial("tcp", m.a.RouteAddr(0).String())
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			b.SetBytes(2 * chunk)
			for b.Loop() {
				done := make(chan error, 1)
				go func() {
					_, err := c.Write(buf)
					done <- err
				}()
				if _, err := io.ReadFull(c, make([]byte, chunk)); err != nil {
					b.Fatal(err)
				}
				if err := <-done; err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkAuditAck is what durable acknowledgement of audit records costs the
// handshake rate: new agent connections through a proxy pair on loopback,
// each a full TLS handshake whose record both proxies write to a real
// audit.Log in the test's temporary directory. durable (the default) serves
// a connection only once its handshake record is fsynced; queued once it is
// queued. Serially every handshake waits for its own fsync; 16 at a time,
// concurrent handshakes share one (group commit). The handshakes/s metric is
// what to compare; the goal is durable within 5% of queued at c=16.
//
//	go test -run '^$' -bench AuditAck -benchtime 3s ./proxy/
func BenchmarkAuditAck(b *testing.B) {
	for _, ack := range []proxy.AuditAck{proxy.AuditAckQueued, proxy.AuditAckDurable} {
		mesh := func(b *testing.B) *mesh {
			return newMeshWith(b, echo, func(c *proxy.Config) {
				c.DisableResumption = true
				c.AuditAck = ack
				c.Audit = testaudit.Start(b, filepath.Join(b.TempDir(), "audit.log"))
			})
		}
		b.Run("c1/"+string(ack), func(b *testing.B) {
			m := mesh(b)
			roundTrip(b, m)
			start := time.Now()
			for b.Loop() {
				roundTrip(b, m)
			}
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "handshakes/s")
		})
		b.Run("c16/"+string(ack), func(b *testing.B) {
			m := mesh(b)
			roundTrip(b, m)
			b.SetParallelism(16 / max(1, runtime.GOMAXPROCS(0)))
			start := time.Now()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					roundTrip(b, m)
				}
			})
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "handshakes/s")
		})
	}
}

// BenchmarkAttestAuthorize is what attestation and authorization add to each
// captured connection, on a real loopback connection: the uid owning the
// agent's socket (sockowner.UID, from the kernel's socket table), the agent
// registered for it (Agents.ByUID), the outbound decision on this proxy and
// the inbound one its peer makes (policy.Authz.Outbound and Inbound, with
// the rules an operator would write).
//
//	go test -run '^$' -bench AttestAuthorize -benchmem ./proxy/
func BenchmarkAttestAuthorize(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer client.Close()
	agent, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	defer agent.Close()
	local, remote := addrPort(b, agent.RemoteAddr()), addrPort(b, agent.LocalAddr())

	ca := testca.New(b)
	agents := newAgents().add(ownUID(), agentX, testca.NewCredentials(ca, ca.SVID(b, agentX))).listen(8080, agentY)
	authz := mustPolicy(b, `
inbound:
  - name: hosts-to-web
    from: [spiffe://example.org/host/*]
    to: {ports: [443]}
  - name: agents-to-y
    from: [spiffe://example.org/agent/*]
    to: {ports: [8080], id: %s}
outbound:
  - name: hosts-anywhere
    from: [spiffe://example.org/host/*]
    to: [spiffe://example.org/*]
  - name: x-to-y
    from: [%s]
    to: [%s]
`, agentY, agentX, agentY)

	step := func() {
		uid, err := sockowner.UID(local, remote)
		if err != nil {
			b.Fatal(err)
		}
		src, _, ok := agents.ByUID(uid)
		if !ok {
			b.Fatalf("uid %d not attested", uid)
		}
		dst, _ := agents.ByPort(8080)
		if !authz.Outbound(src, dst).Allow || !authz.Inbound(src, 8080, dst).Allow {
			b.Fatal("denied")
		}
	}
	b.Run("total", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			step()
		}
	})
	b.Run("sockowner", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := sockowner.UID(local, remote); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("decisions", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if !authz.Outbound(agentX, agentY).Allow || !authz.Inbound(agentX, 8080, agentY).Allow {
				b.Fatal("denied")
			}
		}
	})
}
