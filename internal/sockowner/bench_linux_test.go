package sockowner

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
)

// benchConns is how many established loopback connections the benchmarks hold open,
// so the /proc tables have the thousands of rows of a busy host.
const benchConns = 1000

type socketPair struct{ local, remote netip.AddrPort }

// openConns opens n connections to a loopback listener and returns the client
// sockets' addresses. They are reset rather than closed at the end, so they leave no
// TIME_WAIT rows behind for later benchmarks.
func openConns(b *testing.B, n int) []socketPair {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	pairs := make([]socketPair, 0, n)
	for range n {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() {
			for _, c := range []net.Conn{c, s} {
				if err := c.(*net.TCPConn).SetLinger(0); err != nil {
					b.Error(err)
				}
				c.Close()
			}
		})
		l, r := ends(c)
		pairs = append(pairs, socketPair{l, r})
	}
	return pairs
}

func benchLookup(b *testing.B, fn lookupFunc) {
	pairs := openConns(b, benchConns)
	want := uint32(os.Geteuid())
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		p := pairs[i%len(pairs)]
		i++
		if uid, err := fn(p.local, p.remote); err != nil || uid != want {
			b.Fatalf("owner of %v -> %v = %d, %v", p.local, p.remote, uid, err)
		}
	}
}

// BenchmarkUID is the lookup the proxy makes per captured connection, over sock_diag.
func BenchmarkUID(b *testing.B) {
	if _, err := viaQuery(diagUID)(netip.MustParseAddrPort("127.0.0.1:1"), netip.MustParseAddrPort("127.0.0.1:2")); !errors.Is(err, ErrNotFound) {
		b.Fatalf("sock_diag does not work here (%v): this would measure /proc", err)
	}
	benchLookup(b, UID)
}

// BenchmarkUIDProc is the same lookup by scanning /proc, as without sock_diag.
func BenchmarkUIDProc(b *testing.B) { benchLookup(b, viaQuery(procUID)) }

// BenchmarkUIDNotFound is a sock_diag miss: two lookups (IPv4, then IPv4-mapped) and
// the probe that tells a miss from a missing interface.
func BenchmarkUIDNotFound(b *testing.B) {
	openConns(b, benchConns)
	local, remote := netip.MustParseAddrPort("[::ffff:127.0.0.1]:1"), netip.MustParseAddrPort("[::ffff:127.0.0.1]:2")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := UID(local, remote); !errors.Is(err, ErrNotFound) {
			b.Fatal(err)
		}
	}
}

// BenchmarkUIDParallel runs sock_diag lookups from every CPU at once, as a busy
// proxy accepting connections would.
func BenchmarkUIDParallel(b *testing.B) {
	pairs := openConns(b, benchConns)
	want := uint32(os.Geteuid())
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			p := pairs[i%len(pairs)]
			i++
			if uid, err := UID(p.local, p.remote); err != nil || uid != want {
				b.Errorf("owner of %v -> %v = %d, %v", p.local, p.remote, uid, err)
				return
			}
		}
	})
}
