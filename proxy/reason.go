package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"syscall"

	"github.com/quic-go/quic-go"
	"golang.org/x/net/http2"
)

// Reason names why a connection setup was refused or failed, or how an outbound
// connection was carried (ReasonPassthrough): audit.Handshake.Reason, the keys of
// audit.Refusals.Reasons and the reason label of the refusal metrics. Stable
// identifiers: dashboards, alerts and audit readers match them.
type Reason string

// Handshake refusal reasons (audit.Handshake.Reason).
const (
	ReasonNotTLS            Reason = "not_tls"             // the first bytes were not a TLS handshake
	ReasonTimeout           Reason = "timeout"             // handshake or header not done within HandshakeTimeout
	ReasonPeerClosed        Reason = "peer_closed"         // the peer hung up during setup
	ReasonHandshakeFailed   Reason = "handshake_failed"    // any other TLS failure (versions, ciphers, ...)
	ReasonBadCertificate    Reason = "bad_certificate"     // not a valid X509-SVID (two URI SANs, CA leaf, ...)
	ReasonCertExpired       Reason = "certificate_expired" // chain outside its validity period
	ReasonUnknownAuthority  Reason = "unknown_authority"   // no chain to the bundle of the peer's trust domain
	ReasonALPN              Reason = "alpn_mismatch"       // the tunnel protocol was not negotiated
	ReasonPeerNotAllowed    Reason = "peer_not_allowed"    // inbound: no Service (or not the asked port's) allows the peer
	ReasonPeerMismatch      Reason = "peer_id_mismatch"    // outbound: valid SVID but not Route.PeerID
	ReasonPortNotMeshed     Reason = "port_not_meshed"     // inbound: the asked port is not a Service
	ReasonBadRequest        Reason = "bad_request"         // malformed header or unknown command
	ReasonUnsupported       Reason = "unsupported_version" // unknown header version
	ReasonTargetUnreachable Reason = "target_unreachable"  // the target (or, outbound, the peer's target) did not answer
	ReasonPeerUnreachable   Reason = "peer_unreachable"    // outbound: the peer proxy could not be dialed
	ReasonPeerRefused       Reason = "peer_refused"        // outbound: the peer sent an alert or refused the tunnel
	ReasonNoSVID            Reason = "no_svid"             // Credentials had no valid SVID
	ReasonAuditUnavailable  Reason = "audit_unavailable"   // Audit.Err() != nil, or appending the record failed
	ReasonShutdown          Reason = "shutdown"            // Run's context ended during setup
	ReasonPlaintextRefused  Reason = "plaintext_refused"   // strict mode: plain TCP to a meshed port from another host
	ReasonRevoked           Reason = "revoked"             // the deny-list denies the peer's certificate (or our own)
	ReasonRevocationStale   Reason = "revocation_stale"    // Config.Revocation failed: the deny-list may be out of date
	ReasonPolicyDenied      Reason = "policy_denied"       // the authorization policy does not allow the connection (Config.Policy, SetPolicy)
	ReasonCredentialExpired Reason = "credential_expired"  //nolint:gosec // G101: a reason name, not a credential. inbound: a stream on a pooled connection whose peer certificate (or ours) has expired
	ReasonDrained           Reason = "drained"             // outbound: Drain retired our certificate while a pooled connection was being set up with it
	ReasonMaxStreams        Reason = "max_streams"         // inbound: a stream past PoolMaxStreams open at once on one pooled connection (h2)

	// Limits (docs/limits.md): refused at once, before any handshake work.
	ReasonMaxConnections Reason = "max_connections" // Config.MaxConnections connections were open
	ReasonMaxHandshakes  Reason = "max_handshakes"  // Config.MaxHandshakes inbound handshakes were in flight

	// QUIC datagrams dropped before any connection exists (quicjunk.go).
	ReasonQUICInvalid  Reason = "quic_invalid"  // not a QUIC Initial the server can use: not QUIC, unparsable, another version, too short, an unknown connection
	ReasonQUICOverload Reason = "quic_overload" // dropped because one of quic-go's receive queues was full

	// Certificate rules beyond x509svid.Verify (internal/svidrules).
	ReasonKeyUsage     Reason = "wrong_key_usage"    // the leaf lacks the digitalSignature key usage, or its extended key usage lacks clientAuth (a client) or serverAuth (a server)
	ReasonChainTooLong Reason = "chain_too_long"     // the chain carries more intermediates than Config.MaxIntermediates
	ReasonIDTooLong    Reason = "spiffe_id_too_long" // the leaf's SPIFFE ID is longer than 2,048 bytes

	// Outbound capture (docs/capture.md).
	ReasonPassthrough        Reason = "passthrough"         // result ok: no proxy at the destination, dialed directly (UnknownPassthrough)
	ReasonUnknownDestination Reason = "unknown_destination" // no proxy at the destination and Unknown is UnknownDeny
	ReasonNoOriginalDst      Reason = "no_original_dst"     // a connection to the Outbound port that iptables did not redirect
	ReasonLoop               Reason = "loop"                // the destination is this proxy itself (or, captured, the peer's own tunnel)
	ReasonUnsupportedRequest Reason = "unsupported_request" // explicit: a valid request the proxy does not serve (SOCKS BIND, auth, ...)
	ReasonResolveFailed      Reason = "resolve_failed"      // explicit: the requested host name did not resolve
	ReasonUnattested         Reason = "unattested"          // the connecting process is no registered agent, and Unattested is UnattestedDeny
	ReasonNotLocal           Reason = "not_local"           // transparent or explicit: the client's address is not one of this host's (no open relay)
)

// resultFor maps a reason to the handshake result (the strings of
// audit.Result, also the result label): "" and passthrough are success,
// operational failures are errors, everything else is a refusal.
func resultFor(reason Reason) string {
	switch reason {
	case "":
		return resultOK
	case ReasonPassthrough:
		return resultOK
	case ReasonNoSVID, ReasonTargetUnreachable, ReasonPeerUnreachable, ReasonAuditUnavailable, ReasonShutdown,
		ReasonResolveFailed, ReasonRevocationStale:
		return resultError
	default:
		return resultRefused
	}
}

// classify names why a handshake or tunnel setup failed. Typed errors come
// first (a refusal from our own callbacks is the most precise), then the
// shapes crypto/tls and net give us. ctx is the connection's context: once
// it is done, failures are a consequence of the shutdown, whatever they look
// like.
func classify(ctx context.Context, err error) Reason {
	var r *refusal
	var re *requestError
	var rh tls.RecordHeaderError
	var op *net.OpError
	switch {
	case errors.As(err, &r):
		return r.reason
	case errors.As(err, &re):
		return re.reason
	case ctx.Err() != nil:
		return ReasonShutdown
	case errors.As(err, &rh):
		return ReasonNotTLS
	case isTimeout(err):
		return ReasonTimeout
	case errors.As(err, &op) && op.Op == "remote error":
		// The peer sent a TLS alert: it refused our certificate or
		// something else about the handshake.
		return ReasonPeerRefused
	case quicRefused(err):
		return ReasonPeerRefused
	case peerEnded(err):
		return ReasonPeerClosed
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return ReasonPeerClosed
	case errors.Is(err, ErrUnsupportedVersion):
		return ReasonUnsupported
	case errors.Is(err, ErrBadHeader):
		return ReasonBadRequest
	default:
		return ReasonHandshakeFailed
	}
}

// peerEnded reports whether err is a pooled transport's way of saying that
// the peer reset the stream or closed the connection.
func peerEnded(err error) bool {
	var se http2.StreamError
	var ga http2.GoAwayError
	var ce http2.ConnectionError
	var qs *quic.StreamError
	var qa *quic.ApplicationError
	var qr *quic.StatelessResetError
	return errors.As(err, &se) || errors.As(err, &ga) || errors.As(err, &ce) ||
		errors.As(err, &qs) || errors.As(err, &qa) || errors.As(err, &qr)
}

// quicRefused reports whether the peer closed a quic connection with a TLS
// alert: the QUIC form of a refused handshake.
func quicRefused(err error) bool {
	var te *quic.TransportError
	return errors.As(err, &te) && te.Remote && te.ErrorCode.IsCryptoError()
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) ||
		(errors.As(err, &ne) && ne.Timeout())
}

// classifyVerify names why x509svid.Verify rejected a chain.
func classifyVerify(err error) Reason {
	var ua x509.UnknownAuthorityError
	var ci x509.CertificateInvalidError
	switch {
	case errors.As(err, &ua):
		return ReasonUnknownAuthority
	case errors.As(err, &ci) && ci.Reason == x509.Expired:
		return ReasonCertExpired
	default:
		return ReasonBadCertificate
	}
}

// capturedResult maps a reason to the result label of
// agentmesh_proxy_captured_total, which tells passthrough from a tunnel and
// the Unknown policy's denial from other refusals.
func capturedResult(reason Reason) string {
	switch reason {
	case ReasonPassthrough:
		return resultPassthrough
	case ReasonUnknownDestination:
		return resultDenied
	default:
		return resultFor(reason)
	}
}
