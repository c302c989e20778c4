package sockowner

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The tests start copies of the test binary as child processes (as another uid, or
// without sock_diag); childEnv selects what TestChildProcess does in them.
const (
	childEnv     = "SOCKOWNER_TEST_CHILD"
	childAddrEnv = "SOCKOWNER_TEST_ADDR"

	childDial      = "dial"      // dial childAddrEnv, print the local address, hold the connection until stdin closes
	childDialClose = "dialclose" // the same, but close the connection at once
	childNoDiag    = "nodiag"    // run the no-sock_diag checks in a process where sock_diag is refused

	nobody = 65534
)

var childBin struct {
	once      sync.Once
	dir, path string
	err       error
}

func TestMain(m *testing.M) {
	m.Run()
	if childBin.dir != "" {
		if err := os.RemoveAll(childBin.dir); err != nil {
			fmt.Fprintln(os.Stderr, "remove the child binary:", err)
		}
	}
}

// childBinary returns a copy of the test binary that other uids may run: go test
// builds it in a directory only its owner can enter.
func childBinary(t testing.TB) string {
	t.Helper()
	childBin.once.Do(func() {
		childBin.path, childBin.err = copyExecutable(&childBin.dir)
	})
	if childBin.err != nil {
		t.Fatalf("copy test binary: %v", childBin.err)
	}
	return childBin.path
}

func copyExecutable(dir *string) (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	if *dir, err = os.MkdirTemp("", "sockowner-test-"); err != nil {
		return "", err
	}
	if err := os.Chmod(*dir, 0o755); err != nil {
		return "", err
	}
	src, err := os.Open(exe)
	if err != nil {
		return "", err
	}
	defer func() { _ = src.Close() }() // read only
	path := filepath.Join(*dir, "sockowner.test")
	dst, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		return "", err
	}
	if _, err := io.Copy(dst, src); err != nil {
		return "", errors.Join(err, dst.Close())
	}
	return path, dst.Close()
}

// TestChildProcess is the body of the child processes; run directly it does nothing.
func TestChildProcess(t *testing.T) {
	switch mode := os.Getenv(childEnv); mode {
	case "":
		t.Skip("runs only as a child process of the other tests")
	case childDial, childDialClose:
		c, err := net.Dial("tcp", os.Getenv(childAddrEnv))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := fmt.Fprintln(os.Stdout, c.LocalAddr()); err != nil {
			t.Fatal(err)
		}
		if mode == childDialClose {
			c.Close()
		}
		if _, err := io.Copy(io.Discard, os.Stdin); err != nil {
			t.Fatal(err)
		}
	case childNoDiag:
		if err := refuseSockDiag(); err != nil {
			t.Fatalf("install seccomp filter: %v", err)
		}
		checkWithoutSockDiag(t)
	default:
		t.Fatalf("unknown child mode %q", mode)
	}
}

// dialAs starts a child process running as uid that dials addr and holds the
// connection while the test runs. It returns the child's address as the child sees it
// and the connection accepted from ln.
func dialAs(t *testing.T, ln net.Listener, addr string, uid uint32, mode string) (netip.AddrPort, *net.TCPConn) {
	t.Helper()
	cmd := exec.Command(childBinary(t), "-test.run=^TestChildProcess$")
	cmd.Env = append(os.Environ(), childEnv+"="+mode, childAddrEnv+"="+addr, childRace())
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := false
	t.Cleanup(func() {
		stdin.Close()
		if waited {
			return
		}
		if err := cmd.Wait(); err != nil {
			t.Errorf("child process: %v\n%s", err, stderr.Bytes())
		}
	})
	out := bufio.NewReader(stdout)
	line, err := out.ReadString('\n')
	local, perr := netip.ParseAddrPort(strings.TrimSpace(line))
	if err != nil || perr != nil {
		stdin.Close()
		rest, _ := io.ReadAll(out)
		werr := cmd.Wait()
		waited = true
		t.Fatalf("child process: %v\n%s%s%s", werr, line, rest, stderr.Bytes())
	}
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return local, c.(*net.TCPConn)
}

// childRace keeps a race-enabled child from idling a second before it exits.
func childRace() string {
	return "GORACE=" + os.Getenv("GORACE") + " atexit_sleep_ms=0"
}

// refuseSockDiag makes every thread of this process fail to open NETLINK_SOCK_DIAG
// sockets with EPROTONOSUPPORT, as a kernel built without sock_diag does.
func refuseSockDiag() error {
	var arch uint32
	switch runtime.GOARCH {
	case "amd64":
		arch = unix.AUDIT_ARCH_X86_64
	case "arm64":
		arch = unix.AUDIT_ARCH_AARCH64
	default:
		return errors.ErrUnsupported
	}
	// Offsets in struct seccomp_data; arguments are 64-bit, their low word first on
	// these little-endian machines.
	const (
		nr   = 0
		auda = 4
		arg0 = 16
		arg2 = 32
	)
	load := func(off uint32) unix.SockFilter {
		return unix.SockFilter{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: off}
	}
	// unlessEq skips skip instructions when the accumulator is not k.
	unlessEq := func(k uint32, skip uint8) unix.SockFilter {
		return unix.SockFilter{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: k, Jf: skip}
	}
	ret := func(k uint32) unix.SockFilter {
		return unix.SockFilter{Code: unix.BPF_RET | unix.BPF_K, K: k}
	}
	prog := []unix.SockFilter{
		load(auda), unlessEq(arch, 7),
		load(nr), unlessEq(unix.SYS_SOCKET, 5),
		load(arg0), unlessEq(unix.AF_NETLINK, 3),
		load(arg2), unlessEq(unix.NETLINK_SOCK_DIAG, 1),
		ret(unix.SECCOMP_RET_ERRNO | uint32(unix.EPROTONOSUPPORT)),
		ret(unix.SECCOMP_RET_ALLOW),
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return err
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	tid, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER,
		unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&fprog))) //nolint:gosec // G103: seccomp(2) takes the filter program by address
	runtime.KeepAlive(prog)
	if errno != 0 {
		return errno
	}
	if tid != 0 {
		return fmt.Errorf("thread %d could not take the filter", tid)
	}
	return nil
}
