package proxy

import (
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// origDstSupported: transparent capture works on this platform.
const origDstSupported = true

// ip6tSOOriginalDst is IP6T_SO_ORIGINAL_DST from linux/netfilter_ipv6/
// ip6_tables.h, which x/sys/unix does not define. It has the same value as
// SO_ORIGINAL_DST but is read at level SOL_IPV6.
const ip6tSOOriginalDst = 80

// origDst returns the destination c had before iptables REDIRECTed it, from
// conntrack: SO_ORIGINAL_DST at SOL_IP for IPv4 (also on a dual-stack
// socket, where IPv4 peers appear IPv4-mapped), IP6T_SO_ORIGINAL_DST at
// SOL_IPV6 for IPv6. A connection conntrack knows but that was not
// redirected returns its own local address; the caller checks for that.
// Errors wrap ErrNoOriginalDst.
func origDst(c net.Conn) (_ netip.AddrPort, err error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("%w: %T has no socket", ErrNoOriginalDst, c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%w: %w", ErrNoOriginalDst, err)
	}
	level, opt, size := unix.SOL_IP, unix.SO_ORIGINAL_DST, sizeofSockaddrInet4
	if local := addrPortOf(c.LocalAddr()); local.Addr().Is6() {
		level, opt, size = unix.SOL_IPV6, ip6tSOOriginalDst, sizeofSockaddrInet6
	}
	var buf [sizeofSockaddrInet6]byte
	n := uint32(size)
	var errno syscall.Errno
	cerr := rc.Control(func(fd uintptr) {
		// x/sys/unix has no getsockopt for an arbitrary buffer; the
		// kernel writes at most n bytes to buf and the new length to n.
		_, _, errno = unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), uintptr(opt),
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0) //nolint:gosec // G103: getsockopt writes into buf and n, both live for the call
	})
	switch {
	case cerr != nil:
		return netip.AddrPort{}, fmt.Errorf("%w: %w", ErrNoOriginalDst, cerr)
	case errno != 0:
		return netip.AddrPort{}, fmt.Errorf("%w: getsockopt SO_ORIGINAL_DST: %w", ErrNoOriginalDst, errno)
	case n > uint32(len(buf)):
		return netip.AddrPort{}, fmt.Errorf("%w: getsockopt returned %d bytes", ErrNoOriginalDst, n)
	}
	return parseOrigDst(buf[:n])
}
