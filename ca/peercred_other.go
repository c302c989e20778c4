//go:build !linux

package ca

import (
	"errors"
	"net"
)

// peerUID is not implemented off Linux: the admin API then refuses every caller.
func peerUID(net.Conn) (int, error) {
	return -1, errors.New("peer credentials are not supported on this platform")
}
