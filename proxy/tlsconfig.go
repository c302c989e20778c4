package proxy

import (
	"crypto/tls"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// The tls.Configs are built once, in New. Certificates come from callbacks
// that read Credentials on every handshake (hot swap without rebuilding), and
// trust comes from Credentials in VerifyConnection, so nothing in a config
// ever goes stale.
//
// Session resumption is off on both sides for now. Resumption will come back
// together with rotator-owned ticket keys that can be dropped on a security
// event; authorization already lives in VerifyConnection, which also runs on
// resumed sessions, so enabling it will not bypass a decision.

// serverTLSConfig terminates inbound tunnels.
func (p *Proxy) serverTLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		MaxVersion: tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return p.currentCertificate()
		},
		// The chain is verified in VerifyConnection against the trust
		// bundle of the peer's own trust domain (x509svid rules), which
		// ClientCAs cannot express; RequireAnyClientCert only makes sure
		// there is a certificate to verify.
		ClientAuth:             tls.RequireAnyClientCert,
		VerifyConnection:       p.verifyInbound,
		NextProtos:             []string{ALPN},
		SessionTicketsDisabled: true,
	}
}

// clientTLSConfig originates tunnels to one peer identity (see clientTLS);
// peerID is the only identity it accepts.
func (p *Proxy) clientTLSConfig(peerID spiffeid.ID) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		MaxVersion: tls.VersionTLS13,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return p.currentCertificate()
		},
		// InsecureSkipVerify turns off only the WebPKI hostname and chain
		// check, which cannot work here: SVIDs carry no DNS names and chain
		// to per-trust-domain bundles. VerifyConnection replaces it: it
		// verifies the x509svid chain against the current bundle and
		// requires the exact Route.PeerID or Peer.ID, and it runs on every
		// handshake.
		InsecureSkipVerify: true, //nolint:gosec // replaced by VerifyConnection, see above
		VerifyConnection: func(cs tls.ConnectionState) error {
			return p.verifyOutbound(cs, peerID)
		},
		NextProtos: []string{ALPN},
	}
}

// currentCertificate reads the SVID for one handshake.
func (p *Proxy) currentCertificate() (*tls.Certificate, error) {
	cert, err := p.cfg.Credentials.TLSCertificate()
	if err != nil {
		return nil, &refusal{reason: ReasonNoSVID, err: fmt.Errorf("%w: %w", ErrNoSVID, err)}
	}
	return cert, nil
}

// verifyPeer checks that the peer negotiated the tunnel protocol and
// presented a valid X509-SVID chaining to the bundle of its trust domain.
// x509svid.Verify rejects foreign CAs, expired chains, leaves with zero or
// several URI SANs and CA leaves.
func (p *Proxy) verifyPeer(cs tls.ConnectionState) (spiffeid.ID, string, error) {
	if cs.NegotiatedProtocol != ALPN {
		return spiffeid.ID{}, "", &refusal{reason: ReasonALPN,
			err: fmt.Errorf("%w: got %q", ErrALPN, cs.NegotiatedProtocol)}
	}
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, "", &refusal{reason: ReasonBadCertificate,
			err: fmt.Errorf("%w: no certificate", ErrBadCertificate)}
	}
	leaf := cs.PeerCertificates[0]
	serial := leaf.SerialNumber.String()
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return spiffeid.ID{}, serial, &refusal{reason: ReasonBadCertificate, peerSerial: serial,
			err: fmt.Errorf("%w: %w", ErrBadCertificate, err)}
	}
	if _, _, err := x509svid.Verify(cs.PeerCertificates, p.cfg.Credentials); err != nil {
		reason := classifyVerify(err)
		// A trust domain without a bundle fails inside Verify with the
		// source's own error; name it for what it is.
		if _, berr := p.cfg.Credentials.GetX509BundleForTrustDomain(id.TrustDomain()); berr != nil {
			reason = ReasonUnknownAuthority
		}
		return id, serial, &refusal{reason: reason, peerID: id.String(), peerSerial: serial,
			err: fmt.Errorf("%w: %w", ErrBadCertificate, err)}
	}
	return id, serial, nil
}

// verifyInbound admits a peer that is allowed by at least one Service. The
// per-port check follows once the header names the port.
func (p *Proxy) verifyInbound(cs tls.ConnectionState) error {
	id, serial, err := p.verifyPeer(cs)
	if err != nil {
		return err
	}
	if _, ok := p.allowedAnywhere[id]; !ok {
		return &refusal{reason: ReasonPeerNotAllowed, peerID: id.String(), peerSerial: serial,
			err: fmt.Errorf("%w: %s", ErrPeerNotAllowed, id)}
	}
	return nil
}

// verifyOutbound admits only the route's peer identity.
func (p *Proxy) verifyOutbound(cs tls.ConnectionState, want spiffeid.ID) error {
	id, serial, err := p.verifyPeer(cs)
	if err != nil {
		return err
	}
	if id != want {
		return &refusal{reason: ReasonPeerMismatch, peerID: id.String(), peerSerial: serial,
			err: fmt.Errorf("%w: got %s, want %s", ErrPeerMismatch, id, want)}
	}
	return nil
}
