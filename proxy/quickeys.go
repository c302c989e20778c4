package proxy

import (
	_ "unsafe" // for go:linkname
)

// quicSetKeyUpdateInterval sets quic-go's key-update interval: the number of packets
// sent or received with one traffic key before either side starts a key update
// (RFC 9001 section 6). quic-go keeps it, process-wide, in an internal package that its
// public API does not reach. The symbol belongs to the quic-go version pinned in
// go.mod (v0.65.0); should a later version drop or rename it, the build fails at link
// time instead of ignoring the setting.
//
//go:linkname quicSetKeyUpdateInterval github.com/quic-go/quic-go/internal/handshake.SetKeyUpdateInterval
func quicSetKeyUpdateInterval(packets uint64) (reset func())
