package proxy

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// markSupported: SO_MARK exists on this platform.
const markSupported = true

// markControl returns a net.Dialer.Control that sets SO_MARK to mark on
// every socket before it connects, so the SYN already carries it and
// iptables can exclude the proxy's own traffic from capture.
func markControl(mark int) func(network, address string, c syscall.RawConn) error {
	return func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark)
		}); err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("set SO_MARK %#x: %w", uint32(mark), serr)
		}
		return nil
	}
}

// checkMark sets mark on a throwaway socket, so that a proxy without
// CAP_NET_ADMIN fails in New rather than on every connection.
func checkMark(mark int) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("check SO_MARK: %w", err)
	}
	defer func() { _ = unix.Close(fd) }()
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_MARK, mark); err != nil {
		return fmt.Errorf("set SO_MARK %#x (needs CAP_NET_ADMIN): %w", uint32(mark), err)
	}
	return nil
}
