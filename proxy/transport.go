package proxy

import (
	"fmt"
	"slices"
)

// Tunnel transports: how a proxy carries agent connections to a peer proxy
// (docs/tunnel.md). They share verification, policy, revocation, drain and
// audit; they differ in what one handshake pays for.
const (
	// TransportTLS carries each agent connection on its own TLS 1.3
	// connection to the peer's tunnel port (TCP). Every proxy accepts it.
	TransportTLS = "tls"
	// TransportH2 carries each agent connection as one HTTP/2 CONNECT stream
	// of a long-lived, pooled mTLS connection to the peer's tunnel port
	// (TCP), the shape of Istio's HBONE.
	TransportH2 = "h2"
	// TransportQUIC carries each agent connection as one stream of a
	// long-lived, pooled QUIC connection to the peer's tunnel port (UDP).
	TransportQUIC = "quic"
)

// Application protocols (ALPN) of the transports other than tls (whose
// protocol is ALPN). A connection that negotiated none of them is refused.
const (
	// ALPNH2 is negotiated by the h2 transport on the TCP tunnel port.
	ALPNH2 = "h2"
	// ALPNQUIC is negotiated by the quic transport on the UDP tunnel port.
	ALPNQUIC = "agentmesh-quic/1"
)

// knownTransport reports whether t names a transport this build speaks.
func knownTransport(t string) bool {
	return t == TransportTLS || t == TransportH2 || t == TransportQUIC
}

// chooseTransport picks the transport for a captured connection to a peer
// that accepts accepts (nil or empty: tls only): the first of ours (most
// preferred first) the peer also accepts, else tls, which every tunnel
// listener accepts.
func chooseTransport(ours, accepts []string) string {
	for _, t := range ours {
		if t == TransportTLS || slices.Contains(accepts, t) {
			return t
		}
	}
	return TransportTLS
}

// transportOf maps a negotiated application protocol to its transport; ""
// for one this proxy does not speak.
func transportOf(alpn string) string {
	switch alpn {
	case ALPN:
		return TransportTLS
	case ALPNH2:
		return TransportH2
	case ALPNQUIC:
		return TransportQUIC
	default:
		return ""
	}
}

// validateTransports checks Config.Transports: known names, each once.
func validateTransports(ts []string) error {
	for i, t := range ts {
		if !knownTransport(t) {
			return fmt.Errorf("%w: Transports: unknown transport %q (tls, h2 or quic)", ErrInvalidConfig, t)
		}
		if slices.Contains(ts[:i], t) {
			return fmt.Errorf("%w: Transports: %q listed twice", ErrInvalidConfig, t)
		}
	}
	return nil
}

// offers reports whether the proxy speaks transport t (tls always).
func (c Config) offers(t string) bool {
	return t == TransportTLS || slices.Contains(c.Transports, t)
}
