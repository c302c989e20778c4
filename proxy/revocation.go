package proxy

import (
	"crypto/x509"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/svidrules"
)

// Denier is the revocation deny-list the proxy enforces. Implemented by
// *meshapi.DenyList.
type Denier interface {
	// Denies reports whether a certificate for id with this serial
	// (decimal) and this NotBefore is revoked: the serial is, or the
	// identity was revoked after the certificate was issued (the list
	// compares notBefore with the revocation's cutoff, so a reinstated
	// identity's new certificates pass). It is called on every handshake
	// and, under the registry lock, for every live connection when the
	// list changes, so it must be quick, must not block and must be safe
	// for concurrent use. A list must not change once given to
	// SetDenyList: a new version is a new SetDenyList.
	Denies(id spiffeid.ID, serial string, notBefore time.Time) bool
}

// issuerDenier is a Denier that also denies whole issuers: the CA keys a rotation of
// the CA's trust anchors retired, by svidrules.KeyFingerprint. Implemented by
// *meshapi.DenyList.
type issuerDenier interface {
	DeniesIssuer(keyFingerprint string) bool
}

// deniesIssuer reports whether the deny-list in force denies the CA certificate that
// issued chain[0] (chain[1]): a retired intermediate still valid under a kept root.
func (p *Proxy) deniesIssuer(chain []*x509.Certificate) bool {
	st := p.deny.Load()
	if st == nil || len(chain) < 2 {
		return false
	}
	d, ok := st.list.(issuerDenier)
	return ok && d.DeniesIssuer(svidrules.KeyFingerprint(chain[1]))
}

// denyState is the deny-list in force; list is nil for none.
type denyState struct{ list Denier }

// denies reports whether the deny-list in force denies (id, serial,
// notBefore).
func (p *Proxy) denies(id spiffeid.ID, serial string, notBefore time.Time) bool {
	st := p.deny.Load()
	return st != nil && st.list != nil && st.list.Denies(id, serial, notBefore)
}

// deniedConn reports whether the deny-list in force denies the peer
// credential or the local credential (the host's or an agent's) of an
// established connection. Passthrough connections carry neither and are
// never denied.
func (p *Proxy) deniedConn(ci ConnInfo) bool {
	return (ci.PeerSerial != "" && p.denies(ci.PeerID, ci.PeerSerial, ci.PeerNotBefore)) ||
		(ci.LocalSerial != "" && p.denies(ci.LocalID, ci.LocalSerial, ci.LocalNotBefore))
}

// SetDenyList makes d the deny-list in force (nil: none) and returns how many
// live connections it closed. In force means: VerifyConnection (inbound and
// outbound, new and resumed sessions) refuses a peer whose (ID, leaf serial)
// d denies, reason "revoked", and no handshake presents an SVID of ours that
// d denies; every established connection whose peer credential (PeerID,
// PeerSerial, PeerNotBefore) or whose local credential (the SVID this proxy
// presented on it, LocalSerial, LocalNotBefore) d denies is closed at once and audited with reason
// "revoked"; all session-ticket keys are replaced and the client session
// caches emptied, so no ticket issued before resumes. Streams of pooled
// connections (h2, quic) count as connections, and a pooled connection that
// d denies is closed at once with them. Safe for concurrent
// use, though lists are meant to come in version order from one feed: of
// two concurrent calls, the one that stores its list last wins.
//
// Order matters: the list is in force before anything is closed, so a
// handshake that completes meanwhile is either refused by VerifyConnection
// or registered in time to be found; a connection that passed verification
// just before the change checks the list again when it registers.
func (p *Proxy) SetDenyList(d Denier) (closed int) {
	p.deny.Store(&denyState{list: d})
	// Belt and braces: resumption goes through VerifyConnection, which
	// enforces d anyway.
	p.ResetTicketKeys(triggerDenyList)

	var victims []*tunnelConn
	p.registry.mu.Lock()
	for _, c := range p.registry.conns {
		if p.deniedConn(c.info) {
			victims = append(victims, c)
		}
	}
	var muxes []*muxConn
	for m := range p.registry.muxes {
		if p.deniedConn(m.info()) {
			muxes = append(muxes, m)
		}
	}
	p.registry.mu.Unlock()
	for _, c := range victims {
		if c.revoke() {
			closed++
		}
	}
	for _, m := range muxes {
		m.close(false)
	}
	return closed
}
