package proxy

import (
	"encoding/binary"
	"fmt"
)

// Tunnel wire format, version 1 (docs/tunnel.md is the normative text).
//
// After the TLS handshake the client sends an 8-byte header:
//
//	offset 0..3  magic "AMSH"
//	offset 4     version (0x01)
//	offset 5     command (0x01 = connect)
//	offset 6..7  target port, uint16 big-endian, non-zero
//
// and may send payload right behind it. The server answers with one status
// byte before any payload; on a non-zero status it closes the tunnel.
const (
	// ALPN is the application protocol both sides negotiate. A peer that
	// does not offer it is refused, so the tunnel port cannot be confused
	// with another TLS protocol.
	ALPN = "agentmesh-tunnel/1"

	headerLen = 8

	headerVersion1 byte = 0x01
	commandConnect byte = 0x01
)

// headerMagic opens every tunnel header; it makes a stray client fail fast
// and visibly rather than have its bytes taken as a port number.
var headerMagic = [4]byte{'A', 'M', 'S', 'H'}

// status is the one byte the server answers the header with.
type status byte

const (
	statusOK          status = 0x00
	statusNotAllowed  status = 0x01 // the peer may not reach the target port
	statusUnreachable status = 0x02 // the target refused or did not answer
	statusBadRequest  status = 0x03 // malformed header, unknown version or command

	// statusGoaway, or-ed into statusOK on a quic stream, asks the client to open
	// no more streams on this connection. It repeats the control stream's
	// quicGoaway in order with the answer, which the control stream cannot be.
	statusGoaway status = 0x80
)

// header is a parsed tunnel header.
type header struct {
	Version byte
	Command byte
	Port    uint16
}

// appendHeader appends the version-1 connect header for port to b.
func appendHeader(b []byte, port uint16) []byte {
	b = append(b, headerMagic[:]...)
	b = append(b, headerVersion1, commandConnect)
	return binary.BigEndian.AppendUint16(b, port)
}

// parseHeader parses exactly one header from b. It checks everything it can
// without policy: the magic, the version, the command and a non-zero port.
// Errors wrap ErrBadHeader or ErrUnsupportedVersion.
func parseHeader(b []byte) (header, error) {
	if len(b) != headerLen {
		return header{}, fmt.Errorf("%w: length %d, want %d", ErrBadHeader, len(b), headerLen)
	}
	if [4]byte(b[:4]) != headerMagic {
		return header{}, fmt.Errorf("%w: bad magic %q", ErrBadHeader, b[:4])
	}
	h := header{Version: b[4], Command: b[5], Port: binary.BigEndian.Uint16(b[6:8])}
	if h.Version != headerVersion1 {
		return header{}, fmt.Errorf("%w: version %d", ErrUnsupportedVersion, h.Version)
	}
	if h.Command != commandConnect {
		return header{}, fmt.Errorf("%w: unknown command %d", ErrBadHeader, h.Command)
	}
	if h.Port == 0 {
		return header{}, fmt.Errorf("%w: target port 0", ErrBadHeader)
	}
	return h, nil
}
