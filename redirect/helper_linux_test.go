package redirect

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The behavioural tests need a listener and a client inside a network namespace. They
// re-execute this test binary there (ip netns exec NS <test binary>) in one of two helper
// modes chosen by environment variables, handled by TestMain before any test runs.
const (
	helperEnv = "AGENTMESH_REDIRECT_HELPER" // "serve" | "dial"
	listenEnv = "AGENTMESH_REDIRECT_LISTEN" // serve: "name=host:port,name=host:port"
	addrEnv   = "AGENTMESH_REDIRECT_ADDR"   // dial: host:port
	markEnv   = "AGENTMESH_REDIRECT_MARK"   // dial: SO_MARK for the socket, 0 = none
	uidEnv    = "AGENTMESH_REDIRECT_UID"    // dial: uid to dial as, 0 = stay root

	// SO_ORIGINAL_DST (and IP6T_SO_ORIGINAL_DST): linux/netfilter_ipv4.h, netfilter_ipv6/ip6_tables.h.
	soOriginalDst = 80

	helperTimeout = 10 * time.Second
)

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "serve":
		serveHelper()
		return
	case "dial":
		dialHelper()
		return
	}
	m.Run()
}

// serveHelper listens on every address in listenEnv, prints "ready", and answers each
// connection with one line "<listener name> <original destination or ->" before closing
// it. It exits when stdin closes, which is how the test stops it.
func serveHelper() {
	for spec := range strings.SplitSeq(os.Getenv(listenEnv), ",") {
		name, addr, _ := strings.Cut(spec, "=")
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			fmt.Printf("error: listen %s: %v\n", addr, err)
			return
		}
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				_, _ = fmt.Fprintf(c, "%s %s\n", name, originalDst(c)) // the client reads it or went away
				_ = c.Close()
			}
		}()
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
}

// originalDst is what the proxy will read with SO_ORIGINAL_DST: the destination the client
// dialled before REDIRECT rewrote it. "-" when the kernel has none.
func originalDst(c net.Conn) string {
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return "-"
	}
	v4 := c.LocalAddr().(*net.TCPAddr).IP.To4() != nil
	var dst netip.AddrPort
	var gerr error
	_ = raw.Control(func(fd uintptr) {
		// The getsockopt wrappers of package syscall with a buffer large enough for the
		// sockaddr the kernel writes back (sockaddr_in: 16 bytes, sockaddr_in6: 28).
		if v4 {
			var m *syscall.IPv6Mreq
			m, gerr = syscall.GetsockoptIPv6Mreq(int(fd), syscall.SOL_IP, soOriginalDst)
			if gerr == nil {
				b := m.Multiaddr
				dst = netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:4]))
			}
			return
		}
		var info *syscall.IPv6MTUInfo
		info, gerr = syscall.GetsockoptIPv6MTUInfo(int(fd), syscall.SOL_IPV6, soOriginalDst)
		if gerr == nil {
			var port [2]byte
			binary.NativeEndian.PutUint16(port[:], info.Addr.Port) // stored in network order
			dst = netip.AddrPortFrom(netip.AddrFrom16(info.Addr.Addr), binary.BigEndian.Uint16(port[:]))
		}
	})
	if gerr != nil || !dst.IsValid() {
		return "-"
	}
	return dst.String()
}

// dialHelper connects to addrEnv as uidEnv with markEnv set on the socket and prints the
// line the server answered, or "error: ...".
func dialHelper() {
	mark, _ := strconv.Atoi(os.Getenv(markEnv))
	if uid, _ := strconv.Atoi(os.Getenv(uidEnv)); uid != 0 {
		// Setting SO_MARK needs CAP_NET_ADMIN, which the new uid lacks: one or the other.
		if mark != 0 {
			fmt.Println("error: both a uid and a mark")
			return
		}
		if err := syscall.Setuid(uid); err != nil {
			fmt.Printf("error: setuid %d: %v\n", uid, err)
			return
		}
	}
	d := net.Dialer{Timeout: helperTimeout}
	if mark != 0 {
		d.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK, mark)
			}); err != nil {
				return err
			}
			return serr
		}
	}
	c, err := d.Dial("tcp", os.Getenv(addrEnv))
	if err != nil {
		fmt.Printf("error: %v\n", err)
		return
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(helperTimeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		fmt.Printf("error: read: %v\n", err)
		return
	}
	fmt.Print(line)
}

// startServer runs serveHelper in ns with the given "name=addr" listeners and returns once
// they all listen. The helper stops when the test ends.
func startServer(t *testing.T, ns string, listeners ...string) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, exe)
	cmd.Env = append(helperEnviron(), helperEnv+"=serve", listenEnv+"="+strings.Join(listeners, ","))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start server helper: %v", err)
	}
	t.Cleanup(func() {
		_ = stdin.Close()
		_ = cmd.Wait()
		cancel()
	})
	// Blocks until the helper prints its first line or exits (bounded by ctx).
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if strings.TrimSpace(line) != "ready" {
		t.Fatalf("server helper: %q %v", line, err)
	}
}

// helperEnviron is the environment of a helper process: ours, minus the race detector's
// one-second sleep at exit (the helpers of a -race test binary are race-enabled too).
func helperEnviron() []string {
	return append(os.Environ(), "GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
}

// dialFrom runs dialHelper in ns and returns the server's answer (or the helper's error).
func dialFrom(t *testing.T, ns, addr string, mark, uid int) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, exe)
	cmd.Env = append(helperEnviron(), helperEnv+"=dial", addrEnv+"="+addr,
		markEnv+"="+strconv.Itoa(mark), uidEnv+"="+strconv.Itoa(uid))
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("dial helper: %v", err)
	}
	return strings.TrimSpace(string(out))
}
