package sockowner

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

type lookupFunc func(local, remote netip.AddrPort) (uint32, error)

// lookups are the public function and each kernel interface alone, so that one that
// does not work cannot hide behind the other.
var lookups = []struct {
	name string
	fn   lookupFunc
}{
	{"UID", UID},
	{"sock_diag", viaQuery(diagUID)},
	{"proc", viaQuery(procUID)},
}

func viaQuery(f func(query) (uint32, error)) lookupFunc {
	return func(local, remote netip.AddrPort) (uint32, error) {
		q, err := newQuery(local, remote)
		if err != nil {
			return 0, err
		}
		return f(q)
	}
}

// netCase is a listener and the host a client reaches it at ("": its own address).
type netCase struct {
	name, listen, dialHost string
}

func netCases() []netCase {
	return []netCase{
		{"ipv4", "127.0.0.1:0", ""},
		{"ipv6", "[::1]:0", ""},
		// The accepted socket is an IPv6 one that reports IPv4-mapped addresses.
		{"dual-stack over ipv4", "[::]:0", "127.0.0.1"},
		{"ipv6 link-local", linkLocalListenAddr(), ""},
	}
}

// linkLocalListenAddr returns a listen address on a link-local IPv6 address of this
// host, with its zone; "" when there is none.
func linkLocalListenAddr() string {
	ifs, err := net.Interfaces()
	if err != nil {
		return ""
	}
	for _, ifi := range ifs {
		if ifi.Flags&net.FlagUp == 0 || ifi.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, err := ifi.Addrs()
		if err != nil {
			continue
		}
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok && n.IP.To4() == nil && n.IP.IsLinkLocalUnicast() {
				return net.JoinHostPort(n.IP.String()+"%"+ifi.Name, "0")
			}
		}
	}
	return ""
}

func (c netCase) listenAndDialAddr(t *testing.T) (net.Listener, string) {
	t.Helper()
	if c.listen == "" {
		t.Skip("no address for this case on this host")
	}
	ln, err := net.Listen("tcp", c.listen)
	if err != nil {
		t.Skipf("cannot listen on %s: %v", c.listen, err)
	}
	t.Cleanup(func() { ln.Close() })
	// The listen address, not ln.Addr(), keeps a link-local address's zone.
	host := c.dialHost
	if host == "" {
		host, _, _ = net.SplitHostPort(c.listen)
	}
	return ln, net.JoinHostPort(host, strconv.Itoa(int(addrPort(ln.Addr()).Port())))
}

// connect dials ln from this process and returns both ends.
func connect(t *testing.T, ln net.Listener, addr string) (client, server *net.TCPConn) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

func addrPort(a net.Addr) netip.AddrPort { return a.(*net.TCPAddr).AddrPort() }

func ends(c net.Conn) (local, remote netip.AddrPort) {
	return addrPort(c.LocalAddr()), addrPort(c.RemoteAddr())
}

// otherPort is an address pair for which no connection exists but a listener
// might be found: local is the listener's, the remote port is one nobody dialed from.
func otherPort(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr(), ap.Port()^1)
}

func unmapped(ap netip.AddrPort) netip.AddrPort { return unmapAddrPort(ap) }

func mapped(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom16(ap.Addr().As16()).WithZone(ap.Addr().Zone()), ap.Port())
}

func checkUID(t *testing.T, fn lookupFunc, local, remote netip.AddrPort, want int) {
	t.Helper()
	uid, err := fn(local, remote)
	if err != nil || uid != uint32(want) {
		t.Errorf("owner of %v -> %v = %d, %v; want %d", local, remote, uid, err, want)
	}
}

func checkNotFound(t *testing.T, fn lookupFunc, local, remote netip.AddrPort) {
	t.Helper()
	uid, err := fn(local, remote)
	if !errors.Is(err, ErrNotFound) || uid != 0 {
		t.Errorf("owner of %v -> %v = %d, %v; want ErrNotFound", local, remote, uid, err)
	}
}

func TestOwnSockets(t *testing.T) {
	t.Parallel()
	for _, tc := range netCases() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ln, addr := tc.listenAndDialAddr(t)
			client, server := connect(t, ln, addr)
			cl, cr := ends(client)
			sl, sr := ends(server)
			for _, l := range lookups {
				t.Run(l.name, func(t *testing.T) {
					checkUID(t, l.fn, cl, cr, os.Geteuid())
					checkUID(t, l.fn, sl, sr, os.Geteuid())
					checkNotFound(t, l.fn, sl, otherPort(sr))
					if cl.Addr().Unmap().Is4() {
						// Either form of an IPv4 socket's addresses finds it.
						checkUID(t, l.fn, mapped(cl), mapped(cr), os.Geteuid())
						checkUID(t, l.fn, unmapped(sl), unmapped(sr), os.Geteuid())
					}
				})
			}
		})
	}
}

func TestOtherUsersSocket(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a process as another uid")
	}
	for _, tc := range netCases() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ln, addr := tc.listenAndDialAddr(t)
			childAddr, accepted := dialAs(t, ln, addr, nobody, childDial)
			self, peer := ends(accepted)
			if unmapped(peer) != unmapped(childAddr) {
				t.Fatalf("accepted a connection from %v, the child dialed from %v", peer, childAddr)
			}
			if tc.dialHost != "" && !peer.Addr().Is4In6() {
				t.Fatalf("dual-stack listener reports %v, want an IPv4-mapped address", peer)
			}
			for _, l := range lookups {
				t.Run(l.name, func(t *testing.T) {
					checkUID(t, l.fn, peer, self, nobody)
					checkUID(t, l.fn, self, peer, os.Geteuid())
				})
			}
		})
	}
}

// A listener is what the kernel's exact lookup hands back when no connection has the
// addresses asked for; it must not pass for the connection's owner.
func TestListenerIsNotAnOwner(t *testing.T) {
	t.Parallel()
	ln, addr := netCase{listen: "127.0.0.1:0"}.listenAndDialAddr(t)
	_, server := connect(t, ln, addr)
	local, remote := ends(server)
	remote = otherPort(remote)
	s, err := openDiag()
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	switch m, err := s.exact(unix.AF_INET, local, remote, 0); {
	case errors.Is(err, unix.ENOENT):
		t.Logf("this kernel does not fall back to listeners")
	case err != nil:
		t.Fatal(err)
	case m.state != tcpListen:
		t.Fatalf("kernel answered %+v for %v -> %v", m, local, remote)
	}
	for _, l := range lookups {
		checkNotFound(t, l.fn, local, remote)
	}
}

// Once its process closes it, a socket lingers in the kernel (FIN_WAIT, TIME_WAIT) with
// no owner, and the kernel shows uid 0 for some such sockets.
func TestClosedSocketHasNoOwner(t *testing.T) {
	t.Parallel()
	ln, addr := netCase{listen: "127.0.0.1:0"}.listenAndDialAddr(t)
	client, server := connect(t, ln, addr)
	local, remote := ends(client)
	if err := client.Close(); err != nil {
		t.Fatal(err)
	}
	// EOF: the kernel has the FIN, the client socket is orphaned and draining.
	if _, err := io.Copy(io.Discard, server); err != nil {
		t.Fatal(err)
	}
	s, err := openDiag()
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	m, err := s.exact(unix.AF_INET, local, remote, 0)
	if err != nil || m.local != local || m.inode != 0 {
		t.Fatalf("kernel answered %+v, %v; want the closed socket, without inode", m, err)
	}
	for _, l := range lookups {
		checkNotFound(t, l.fn, local, remote)
	}
}

func TestNotFound(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name          string
		local, remote string
	}{
		{"ipv4", "127.0.0.1:1", "127.0.0.1:2"},
		{"ipv6", "[::1]:1", "[::1]:2"},
		{"ipv4-mapped", "[::ffff:127.0.0.1]:1", "[::ffff:127.0.0.1]:2"},
		{"mixed families", "127.0.0.1:1", "[::1]:2"},
		{"port zero", "127.0.0.1:0", "127.0.0.1:2"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			local, remote := netip.MustParseAddrPort(tc.local), netip.MustParseAddrPort(tc.remote)
			for _, l := range lookups {
				checkNotFound(t, l.fn, local, remote)
			}
		})
	}
}

// TestFallbackWithoutSockDiag runs checkWithoutSockDiag in a child process whose
// NETLINK_SOCK_DIAG sockets the kernel refuses.
func TestFallbackWithoutSockDiag(t *testing.T) {
	t.Parallel()
	if runtime.GOARCH != "amd64" && runtime.GOARCH != "arm64" {
		t.Skip("seccomp filter written for amd64 and arm64")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestChildProcess$", "-test.v")
	cmd.Env = append(os.Environ(), childEnv+"="+childNoDiag, childRace())
	out, err := cmd.CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("--- PASS: TestChildProcess")) {
		t.Fatalf("child process: %v\n%s", err, out)
	}
}

func checkWithoutSockDiag(t *testing.T) {
	if _, err := viaQuery(diagUID)(netip.MustParseAddrPort("127.0.0.1:1"), netip.MustParseAddrPort("127.0.0.1:2")); !errors.Is(err, unix.EPROTONOSUPPORT) {
		t.Fatalf("sock_diag lookup under the filter: %v; want EPROTONOSUPPORT", err)
	}
	for _, tc := range netCases()[:3] {
		t.Run(tc.name, func(t *testing.T) {
			ln, addr := tc.listenAndDialAddr(t)
			client, server := connect(t, ln, addr)
			cl, cr := ends(client)
			sl, sr := ends(server)
			checkUID(t, UID, cl, cr, os.Geteuid())
			checkUID(t, UID, sl, sr, os.Geteuid())
			checkNotFound(t, UID, sl, otherPort(sr))
		})
	}
}
