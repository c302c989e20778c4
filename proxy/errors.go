package proxy

import "errors"

var (
	// ErrInvalidConfig is wrapped by New when the Config is unusable.
	ErrInvalidConfig = errors.New("proxy: invalid config")
	// ErrAlreadyStarted is returned by a second call to Run.
	ErrAlreadyStarted = errors.New("proxy: already started")

	// ErrNoSVID means Credentials had no valid SVID to present.
	ErrNoSVID = errors.New("proxy: no valid svid")
	// ErrAuditUnavailable means the audit log is failing, so new handshakes
	// are refused rather than left unrecorded.
	ErrAuditUnavailable = errors.New("proxy: audit log unavailable")
	// ErrBadHeader means a tunnel header was malformed.
	ErrBadHeader = errors.New("proxy: bad tunnel header")
	// ErrUnsupportedVersion means a tunnel header had an unknown version.
	ErrUnsupportedVersion = errors.New("proxy: unsupported tunnel version")
	// ErrBadCertificate means the peer's certificate is not a valid X509-SVID
	// of a trusted trust domain.
	ErrBadCertificate = errors.New("proxy: bad peer certificate")
	// ErrPeerNotAllowed means a verified peer may not reach what it asked for.
	ErrPeerNotAllowed = errors.New("proxy: peer not allowed")
	// ErrPeerMismatch means the peer proxy presented a valid SVID of another
	// identity than the route expects (impersonation).
	ErrPeerMismatch = errors.New("proxy: unexpected peer identity")
	// ErrPolicyDenied means the authorization policy does not allow a
	// connection: inbound, the peer to reach the port (or its agent);
	// outbound, the local identity to call the destination.
	ErrPolicyDenied = errors.New("proxy: not allowed by policy")
	// ErrUnattested means a captured connection came from a process that
	// is no registered agent (or whose uid could not be found) and
	// Config.Unattested is UnattestedDeny.
	ErrUnattested = errors.New("proxy: connection not attested")
	// ErrALPN means the peer did not negotiate the tunnel protocol.
	ErrALPN = errors.New("proxy: tunnel protocol not negotiated")
	// ErrTunnelRefused means the peer proxy answered a non-zero status.
	ErrTunnelRefused = errors.New("proxy: tunnel refused by peer")
	// ErrRevoked means the deny-list in force denies the peer's
	// certificate or the one this proxy would present.
	ErrRevoked = errors.New("proxy: certificate revoked")
	// ErrRevocationStale means Config.Revocation reported that the
	// deny-list cannot be trusted to be current, so handshakes fail closed.
	ErrRevocationStale = errors.New("proxy: revocation status stale")
	// ErrCredentialExpired means a stream arrived on a pooled connection
	// after a certificate that authenticated it expired.
	ErrCredentialExpired = errors.New("proxy: pooled connection credential expired")
	// ErrMaxStreams means a peer opened more streams at once on a pooled
	// connection than Config.PoolMaxStreams allows it.
	ErrMaxStreams = errors.New("proxy: too many streams on a pooled connection")

	// ErrNoOriginalDst means a connection to the Outbound port has no
	// original destination: it was not redirected by iptables, or the
	// platform cannot tell.
	ErrNoOriginalDst = errors.New("proxy: no original destination")
	// ErrNotLocal means a client of a capture listener (transparent or
	// explicit) connected from an address that is not this host's: the
	// proxy carries only this host's processes, never the network's.
	ErrNotLocal = errors.New("proxy: client not on this host")
	// ErrLoop means a captured destination is the proxy itself.
	ErrLoop = errors.New("proxy: destination is this proxy (loop)")
	// ErrUnknownDestination means no proxy lives at a captured destination
	// and Config.Unknown is UnknownDeny.
	ErrUnknownDestination = errors.New("proxy: no proxy at destination")
	// ErrBadRequest means an explicit-capture client sent a malformed
	// SOCKS5 or HTTP request.
	ErrBadRequest = errors.New("proxy: malformed proxy request")
	// ErrUnsupportedRequest means an explicit-capture client sent a valid
	// request the proxy does not serve (a SOCKS5 BIND, an authentication
	// method other than none, ...).
	ErrUnsupportedRequest = errors.New("proxy: unsupported proxy request")
)

// refusal carries why a handshake or tunnel setup was refused together with
// what is known about the peer, so one audit record can say both. It is
// returned from the TLS callbacks; crypto/tls hands callback errors back from
// Handshake unchanged, which is how the reason survives the handshake.
type refusal struct {
	reason     Reason
	peerID     string
	peerSerial string
	err        error
}

func (r *refusal) Error() string { return r.err.Error() }
func (r *refusal) Unwrap() error { return r.err }

// requestError is a malformed or unsupported explicit-capture request: the
// reason for the audit record and the exact bytes the client gets back (a
// SOCKS5 reply or an HTTP response), decided by the pure parsers.
type requestError struct {
	reason Reason // ReasonBadRequest or ReasonUnsupportedRequest
	reply  []byte // written to the client before closing; nil for none
	err    error  // wraps ErrBadRequest or ErrUnsupportedRequest
}

func (e *requestError) Error() string { return e.err.Error() }
func (e *requestError) Unwrap() error { return e.err }
