package audit

import (
	"crypto/tls"
	"strconv"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/internal/svidrules"
)

// Initiators that name no authenticated caller.
const (
	// InitiatorUnauthenticated: the caller presented no certificate.
	InitiatorUnauthenticated = "unauthenticated"
	// InitiatorUnknown: the caller's certificate carries no usable SPIFFE ID (its
	// serial is in CallerSerial), or a local peer whose uid the kernel did not tell.
	InitiatorUnknown = "unknown"
)

// Actor names who asked for what a record reports. Every record of an administrative
// act embeds one, so its fields sit flat in the record. Fill it with the function of
// the transport the request came over, TLSActor or PeerUIDActor, so that every record
// names a caller the same way; the acts a component does by itself name it
// (Actor{Initiator: "ca"}, "rotator", "sighup").
type Actor struct {
	// Initiator is who asked: the SPIFFE ID of the client certificate (mTLS), "uid:N"
	// (the peer of a local admin socket), or the component that acted by itself.
	Initiator string `json:"initiator"`
	// CallerSerial is the serial (decimal) of the client certificate, over mTLS.
	CallerSerial string `json:"caller_serial,omitempty"`
}

// Caller returns a. Records that embed an Actor have it, so a reader can ask any
// record who asked for it.
func (a Actor) Caller() Actor { return a }

// Attributed is an Event that names its caller: one that embeds an Actor.
type Attributed interface {
	Event
	Caller() Actor
}

// TLSActor is the caller of a request over mutual TLS: the SPIFFE ID and serial of the
// certificate the peer presented (cs.PeerCertificates[0]). A certificate without a
// SPIFFE ID, or with one longer than the specification allows, is InitiatorUnknown
// with its serial; no certificate (or a nil cs) is InitiatorUnauthenticated. It reads
// what the handshake verified and verifies nothing itself.
func TLSActor(cs *tls.ConnectionState) Actor {
	if cs == nil || len(cs.PeerCertificates) == 0 {
		return Actor{Initiator: InitiatorUnauthenticated}
	}
	leaf := cs.PeerCertificates[0]
	a := Actor{Initiator: InitiatorUnknown}
	if leaf.SerialNumber != nil {
		a.CallerSerial = leaf.SerialNumber.String()
	}
	if id, err := x509svid.IDFromCert(leaf); err == nil && len(id.String()) <= svidrules.MaxIDLength {
		a.Initiator = id.String()
	}
	return a
}

// PeerUIDActor is the caller of a request over a local unix socket, whose peer's uid
// the kernel reported (SO_PEERCRED): "uid:N". A negative uid (not reported) is
// InitiatorUnknown.
func PeerUIDActor(uid int) Actor {
	if uid < 0 {
		return Actor{Initiator: InitiatorUnknown}
	}
	return Actor{Initiator: "uid:" + strconv.Itoa(uid)}
}
