package proxy

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
)

// SOCKS5 (RFC 1928) as the explicit listener speaks it: the "no
// authentication" method and the CONNECT command only. Who may use the host's
// identity is decided by who can reach the listener (bind it to loopback),
// not by SOCKS authentication.
const (
	socksVersion5 = 0x05

	socksMethodNone         = 0x00
	socksMethodNoAcceptable = 0xff

	socksCmdConnect = 0x01

	socksAtypIPv4   = 0x01
	socksAtypDomain = 0x03
	socksAtypIPv6   = 0x04

	// Reply codes (REP).
	socksSucceeded            = 0x00
	socksGeneralFailure       = 0x01
	socksNotAllowed           = 0x02 // connection not allowed by ruleset
	socksHostUnreachable      = 0x04
	socksCommandNotSupported  = 0x07
	socksAddrTypeNotSupported = 0x08
)

// socksMethodNoneReply selects "no authentication".
var socksMethodNoneReply = []byte{socksVersion5, socksMethodNone}

// socksRequest is a parsed CONNECT request. Exactly one of addr and host is
// set: a domain name that is an IP literal is taken as the address.
type socksRequest struct {
	addr netip.Addr // never IPv4-mapped, no zone
	host string     // a domain name, to be resolved by the proxy (socks5h)
	port uint16     // never 0
}

// readSOCKSGreeting reads the client's method-selection message (VER
// NMETHODS METHODS) and returns nil when it offers "no authentication", to
// be answered with socksMethodNoneReply. A *requestError carries the "no
// acceptable methods" reply; I/O errors (io.EOF, io.ErrUnexpectedEOF, a
// deadline) come back as they are.
func readSOCKSGreeting(r *bufio.Reader) error {
	var h [2]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return err
	}
	if h[0] != socksVersion5 {
		return socksGreetingError(ReasonBadRequest, fmt.Errorf("%w: socks version %d", ErrBadRequest, h[0]))
	}
	if h[1] == 0 {
		return socksGreetingError(ReasonBadRequest, fmt.Errorf("%w: socks greeting offers no method", ErrBadRequest))
	}
	methods := make([]byte, h[1])
	if _, err := io.ReadFull(r, methods); err != nil {
		return unexpectedEOF(err)
	}
	if !slices.Contains(methods, socksMethodNone) {
		return socksGreetingError(ReasonUnsupportedRequest,
			fmt.Errorf("%w: socks methods %x, only 00 (no authentication) is served", ErrUnsupportedRequest, methods))
	}
	return nil
}

func socksGreetingError(reason Reason, err error) *requestError {
	return &requestError{reason: reason, reply: []byte{socksVersion5, socksMethodNoAcceptable}, err: err}
}

// readSOCKSRequest reads a request (VER CMD RSV ATYP DST.ADDR DST.PORT).
// A *requestError carries the reply for a malformed (general failure) or
// unsupported (command or address type not supported) request; I/O errors
// come back as they are. RSV is not checked: RFC 1928 only reserves it.
func readSOCKSRequest(r *bufio.Reader) (socksRequest, error) {
	var h [4]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return socksRequest{}, err
	}
	if h[0] != socksVersion5 {
		return socksRequest{}, socksError(ReasonBadRequest, socksGeneralFailure,
			fmt.Errorf("%w: socks version %d", ErrBadRequest, h[0]))
	}
	if h[1] != socksCmdConnect {
		return socksRequest{}, socksError(ReasonUnsupportedRequest, socksCommandNotSupported,
			fmt.Errorf("%w: socks command %d, only CONNECT is served", ErrUnsupportedRequest, h[1]))
	}
	var req socksRequest
	switch h[3] {
	case socksAtypIPv4:
		var a [4]byte
		if _, err := io.ReadFull(r, a[:]); err != nil {
			return socksRequest{}, unexpectedEOF(err)
		}
		req.addr = netip.AddrFrom4(a)
	case socksAtypIPv6:
		var a [16]byte
		if _, err := io.ReadFull(r, a[:]); err != nil {
			return socksRequest{}, unexpectedEOF(err)
		}
		req.addr = netip.AddrFrom16(a).Unmap()
	case socksAtypDomain:
		n, err := r.ReadByte()
		if err != nil {
			return socksRequest{}, unexpectedEOF(err)
		}
		name := make([]byte, n)
		if _, err := io.ReadFull(r, name); err != nil {
			return socksRequest{}, unexpectedEOF(err)
		}
		if req.addr, req.host, err = parseHost(string(name)); err != nil {
			return socksRequest{}, socksError(ReasonBadRequest, socksGeneralFailure, err)
		}
	default:
		return socksRequest{}, socksError(ReasonUnsupportedRequest, socksAddrTypeNotSupported,
			fmt.Errorf("%w: socks address type %d", ErrUnsupportedRequest, h[3]))
	}
	var pb [2]byte
	if _, err := io.ReadFull(r, pb[:]); err != nil {
		return socksRequest{}, unexpectedEOF(err)
	}
	req.port = binary.BigEndian.Uint16(pb[:])
	switch {
	case req.port == 0:
		return socksRequest{}, socksError(ReasonBadRequest, socksGeneralFailure, fmt.Errorf("%w: socks port 0", ErrBadRequest))
	case req.addr.IsValid() && req.addr.IsUnspecified():
		return socksRequest{}, socksError(ReasonBadRequest, socksGeneralFailure,
			fmt.Errorf("%w: socks address %s", ErrBadRequest, req.addr))
	}
	return req, nil
}

func socksError(reason Reason, rep byte, err error) *requestError {
	return &requestError{reason: reason, reply: socksReply(rep), err: err}
}

// socksReply is a reply with code rep. BND.ADDR and BND.PORT are zero: the
// proxy's own socket towards the destination means nothing to the client
// (it is a tunnel), and clients do not use them for CONNECT.
func socksReply(rep byte) []byte {
	return []byte{socksVersion5, rep, 0x00, socksAtypIPv4, 0, 0, 0, 0, 0, 0}
}

// appendSOCKSRequest encodes req as a CONNECT request (tests and fuzzing).
func appendSOCKSRequest(b []byte, req socksRequest) []byte {
	b = append(b, socksVersion5, socksCmdConnect, 0x00)
	switch {
	case req.host != "":
		b = append(b, socksAtypDomain, byte(len(req.host)))
		b = append(b, req.host...)
	case req.addr.Is4():
		a := req.addr.As4()
		b = append(b, socksAtypIPv4)
		b = append(b, a[:]...)
	default:
		a := req.addr.As16()
		b = append(b, socksAtypIPv6)
		b = append(b, a[:]...)
	}
	return binary.BigEndian.AppendUint16(b, req.port)
}

// unexpectedEOF turns an EOF inside a message into io.ErrUnexpectedEOF.
func unexpectedEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}
