//go:build !linux

package proxy

import (
	"fmt"
	"net"
	"net/netip"
	"runtime"
)

// origDstSupported: there is no SO_ORIGINAL_DST here; New refuses a Config
// with Outbound set.
const origDstSupported = false

// origDst cannot recover a redirected destination on this platform.
func origDst(net.Conn) (netip.AddrPort, error) {
	return netip.AddrPort{}, fmt.Errorf("%w: transparent capture is not supported on %s", ErrNoOriginalDst, runtime.GOOS)
}
