//go:build !linux

package peercred

import (
	"errors"
	"net"
)

// UID is not implemented off Linux: admin sockets then refuse every caller.
func UID(net.Conn) (int, error) {
	return -1, errors.New("peer credentials are not supported on this platform")
}
