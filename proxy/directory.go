package proxy

import (
	"fmt"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Peer is a proxy that can be reached through the mesh.
type Peer struct {
	// ID is the SPIFFE ID the peer proxy must present. Any other SVID,
	// however valid, is refused (peer_id_mismatch).
	ID spiffeid.ID
	// Tunnel is the host:port of the peer's tunnel listener (TCP; for
	// quic, the UDP port of the same number).
	Tunnel string
	// Transports lists the transports the peer accepts, as its directory
	// entry advertises them (its Config.Transports). Nil or empty means
	// ["tls"], which every proxy accepts.
	Transports []string
	// Agents are the agents registered at the peer's host, by the port
	// they listen on: a connection to one of those ports calls that agent
	// (ConnInfo.DstID, and the destination the policy decides on), any
	// other port the peer proxy itself. Read-only: the proxy never
	// modifies it, and the Directory may share one map between lookups.
	// Nil: none known.
	Agents map[uint16]spiffeid.ID
}

// Directory maps a destination address to the proxy that lives there. The
// proxy consults it for every captured connection (transparent or explicit),
// so lookups are hot-path: PeerFor must do no I/O, must not block, and must
// be safe for concurrent use. The registry client behind it keeps its own
// snapshot up to date.
type Directory interface {
	// PeerFor returns the proxy in front of addr, and false when no proxy
	// lives there (Config.Unknown decides what happens then). addr is
	// never an IPv4-mapped IPv6 address and carries no zone.
	PeerFor(addr netip.Addr) (Peer, bool)
}

// UnknownPolicy is what the proxy does with a captured connection to a
// destination no proxy lives at (the Directory does not know it).
type UnknownPolicy int

const (
	// UnknownDeny refuses the connection and audits the refusal (reason
	// unknown_destination): nothing leaves the host unauthenticated. The
	// default, like Istio's STRICT mode.
	UnknownDeny UnknownPolicy = iota
	// UnknownPassthrough dials the destination directly in plain TCP and
	// audits that it did (reason passthrough, transport tcp), like Istio's
	// PERMISSIVE mode.
	UnknownPassthrough
)

// String returns "deny" or "passthrough".
func (u UnknownPolicy) String() string {
	switch u {
	case UnknownDeny:
		return "deny"
	case UnknownPassthrough:
		return "passthrough"
	default:
		return fmt.Sprintf("UnknownPolicy(%d)", int(u))
	}
}

// lookup asks the Directory, if there is one, for the proxy in front of a.
func (p *Proxy) lookup(a netip.Addr) (Peer, bool) {
	if p.cfg.Directory == nil {
		return Peer{}, false
	}
	return p.cfg.Directory.PeerFor(a.Unmap().WithZone(""))
}
