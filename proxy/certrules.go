package proxy

import (
	"crypto/x509"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/svidrules"
)

// checkDepth refuses a peer chain with more intermediates than
// Config.MaxIntermediates, before any signature of it is checked: a long chain
// costs the verifier a signature each, and the mesh issues one intermediate.
// Anchors of the peer's trust domain sent along are not counted.
func (p *Proxy) checkDepth(chain []*x509.Certificate, id spiffeid.ID) error {
	var anchors []*x509.Certificate
	if b, err := p.cfg.Credentials.GetX509BundleForTrustDomain(id.TrustDomain()); err == nil {
		anchors = b.X509Authorities()
	}
	return svidrules.CheckDepth(chain, anchors, p.cfg.MaxIntermediates)
}

// ruleRefusal is the refusal of a certificate that broke a rule of svidrules.
func ruleRefusal(err error, peerID, serial string) *refusal {
	reason := ReasonBadCertificate
	var v *svidrules.ViolationError
	if errors.As(err, &v) {
		switch v.Rule {
		case svidrules.RuleKeyUsage, svidrules.RuleDigitalSignature:
			reason = ReasonKeyUsage
		case svidrules.RuleChainDepth:
			reason = ReasonChainTooLong
		case svidrules.RuleIDLength:
			reason = ReasonIDTooLong
		}
	}
	return &refusal{reason: reason, peerID: peerID, peerSerial: serial,
		err: fmt.Errorf("%w: %w", ErrBadCertificate, err)}
}

// recordedID is the peer ID a handshake record may carry: one over the SPIFFE
// limit is left out (the record keeps the serial), so that a peer cannot make
// each of its refused attempts write kilobytes of its choosing to the log.
func recordedID(id string) string {
	if len(id) > svidrules.MaxIDLength {
		return ""
	}
	return id
}
