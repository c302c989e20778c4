package sockowner

import (
	"net"
	"net/netip"
	"strconv"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// netlinkUID is UID over github.com/vishvananda/netlink's SocketGet, for comparing the
// library with this package's sock_diag client: the same checks on the answer (the
// kernel's addresses, not a listener, held by a process).
func netlinkUID(get func(local, remote net.Addr) (*netlink.Socket, error)) lookupFunc {
	return func(local, remote netip.AddrPort) (uint32, error) {
		s, err := get(net.TCPAddrFromAddrPort(local), net.TCPAddrFromAddrPort(remote))
		if err != nil {
			return 0, err
		}
		l, _ := netip.AddrFromSlice(s.ID.Source)
		r, _ := netip.AddrFromSlice(s.ID.Destination)
		if netip.AddrPortFrom(l.Unmap(), s.ID.SourcePort) != unmapAddrPort(local) ||
			netip.AddrPortFrom(r.Unmap(), s.ID.DestinationPort) != unmapAddrPort(remote) ||
			s.State == tcpListen || s.INode == 0 {
			return 0, ErrNotFound
		}
		return s.UID, nil
	}
}

// BenchmarkUIDNetlink is BenchmarkUID through netlink.SocketGet, which opens a netlink
// socket per call and asks for a dump filtered by ports.
func BenchmarkUIDNetlink(b *testing.B) { benchLookup(b, netlinkUID(netlink.SocketGet)) }

// BenchmarkUIDNetlinkHandle is BenchmarkUID through a netlink.Handle, which keeps one
// socket (behind a lock) for every call.
func BenchmarkUIDNetlinkHandle(b *testing.B) {
	h, err := netlink.NewHandle(unix.NETLINK_INET_DIAG)
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	benchLookup(b, netlinkUID(h.SocketGet))
}

// TestNetlinkSocketGetMapped pins what netlink.SocketGet cannot do: a socket of
// the IPv6 family connected over IPv4 (a dual-stack listener's accepted connection)
// is known to the kernel by IPv4-mapped addresses, which net.IP turns back into an
// IPv4 query. UID finds it.
func TestNetlinkSocketGetMapped(t *testing.T) {
	ln, err := net.Listen("tcp", "[::]:0")
	if err != nil {
		t.Skipf("no dual-stack listener: %v", err)
	}
	defer ln.Close()
	_, s := connect(t, ln, net.JoinHostPort("127.0.0.1", strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)))
	local, remote := ends(s)
	if _, err := UID(local, remote); err != nil {
		t.Fatalf("UID(%v, %v): %v", local, remote, err)
	}
	// If this starts to pass, the library may do the job: rerun the benchmarks.
	if _, err := netlinkUID(netlink.SocketGet)(mapped(local), mapped(remote)); err == nil {
		t.Fatal("netlink.SocketGet now finds dual-stack sockets: compare it again")
	}
}
