package proxy

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strconv"
)

// Linux socket address layouts as SO_ORIGINAL_DST (struct sockaddr_in) and
// IP6T_SO_ORIGINAL_DST (struct sockaddr_in6) return them. The values are
// Linux's, whatever the build platform, so the decoder and its fuzz target
// run everywhere.
const (
	afInet  = 2  // AF_INET on Linux
	afInet6 = 10 // AF_INET6 on Linux

	sizeofSockaddrInet4 = 16 // family(2) port(2) addr(4) zero(8)
	sizeofSockaddrInet6 = 28 // family(2) port(2) flowinfo(4) addr(16) scope_id(4)
)

// parseOrigDst decodes the socket address the kernel returned for
// SO_ORIGINAL_DST or IP6T_SO_ORIGINAL_DST. sin_family and sin6_scope_id are
// in host byte order, the port in network byte order. The result is never
// IPv4-mapped; a non-zero scope id becomes the zone (a numeric zone, which
// net.Dial accepts). Errors wrap ErrNoOriginalDst.
func parseOrigDst(b []byte) (netip.AddrPort, error) {
	if len(b) < 2 {
		return netip.AddrPort{}, fmt.Errorf("%w: socket address of %d bytes", ErrNoOriginalDst, len(b))
	}
	var ap netip.AddrPort
	switch family := binary.NativeEndian.Uint16(b); family {
	case afInet:
		if len(b) != sizeofSockaddrInet4 {
			return netip.AddrPort{}, fmt.Errorf("%w: sockaddr_in of %d bytes, want %d", ErrNoOriginalDst, len(b), sizeofSockaddrInet4)
		}
		ap = netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:4]))
	case afInet6:
		if len(b) != sizeofSockaddrInet6 {
			return netip.AddrPort{}, fmt.Errorf("%w: sockaddr_in6 of %d bytes, want %d", ErrNoOriginalDst, len(b), sizeofSockaddrInet6)
		}
		a := netip.AddrFrom16([16]byte(b[8:24])).Unmap()
		if scope := binary.NativeEndian.Uint32(b[24:28]); scope != 0 && a.Is6() {
			a = a.WithZone(strconv.FormatUint(uint64(scope), 10))
		}
		ap = netip.AddrPortFrom(a, binary.BigEndian.Uint16(b[2:4]))
	default:
		return netip.AddrPort{}, fmt.Errorf("%w: address family %d", ErrNoOriginalDst, family)
	}
	if ap.Port() == 0 || ap.Addr().IsUnspecified() {
		return netip.AddrPort{}, fmt.Errorf("%w: %s is not a destination", ErrNoOriginalDst, ap)
	}
	return ap, nil
}
