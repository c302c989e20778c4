package meshapi

import (
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// peerRoute is what PeerFor answers for one address, precomputed so that a lookup
// allocates nothing.
type peerRoute struct {
	id         spiffeid.ID
	tunnel     string   // host:port
	transports []string // what the peer accepts, most preferred first; shared, read-only
}

// State is one version of the mesh directory as a proxy holds it: the routes to the
// other proxies, the registration entries and the agents by address, the fleet
// rotation announced, the trust bundle published and the deny-list in force. Immutable once built: share it, never modify it. The zero State
// (version 0) knows no peer.
type State struct {
	version  uint64
	peers    map[netip.Addr]peerRoute
	entries  []Entry        // sorted by ID
	rotation *FleetRotation // as announced, nil when none
	deny     *DenyList      // the verified deny-list in force, nil before the first
	// bundle are the CA's roots the directory published, named by bundleVersion; nil
	// and "" when it published none.
	bundle        []*x509.Certificate
	bundleVersion string
	anchor        *AnchorRotation // the anchor rotation step published, nil when none
	// agents are the agents registered with a port, by port, to the host of the proxy
	// advertising each address (this proxy's own included); the inner maps are shared
	// by every address of a host. Precomputed so that AgentsAt allocates nothing.
	agents map[netip.Addr]map[uint16]spiffeid.ID
}

// DecodeState parses a directory document into the snapshot PeerFor reads,
// leaving out self's entry (see NewState).
func DecodeState(b []byte, self spiffeid.ID) (*State, error) {
	doc, err := ParseDirectory(b)
	if err != nil {
		return nil, err
	}
	return NewState(doc, self)
}

// ParseDirectory decodes a directory document. Fields it does not know (sections of
// newer CAs) are ignored.
func ParseDirectory(b []byte) (*DirectoryDocument, error) {
	var doc DirectoryDocument
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("malformed directory: %w", err)
	}
	return &doc, nil
}

// NewState builds the snapshot PeerFor reads from doc, leaving out self's
// entry. A document with a malformed entry is refused whole (the directory held
// stays): the CA validates every entry, so one that is not is a fault, and a partial
// directory would silently misroute.
func NewState(doc *DirectoryDocument, self spiffeid.ID) (*State, error) {
	if doc.Version == 0 {
		return nil, errors.New("malformed directory: no version")
	}
	snap := &State{version: doc.Version, peers: make(map[netip.Addr]peerRoute), rotation: doc.Rotation,
		anchor: doc.AnchorRotation}
	for i, p := range doc.Peers {
		switch {
		case p.SPIFFEID.IsZero():
			return nil, fmt.Errorf("malformed directory: peer %d has no spiffe_id", i)
		case p.TunnelPort == 0:
			return nil, fmt.Errorf("malformed directory: peer %s has no tunnel_port", p.SPIFFEID)
		case len(p.Addresses) == 0:
			return nil, fmt.Errorf("malformed directory: peer %s has no addresses", p.SPIFFEID)
		}
		if p.SPIFFEID == self {
			continue
		}
		port := strconv.Itoa(int(p.TunnelPort))
		for _, a := range p.Addresses {
			if !a.IsValid() || CheckAdvertisable(a) != nil {
				return nil, fmt.Errorf("malformed directory: peer %s has an invalid address %q", p.SPIFFEID, a)
			}
			a = a.Unmap()
			if other, dup := snap.peers[a]; dup {
				return nil, fmt.Errorf("malformed directory: address %s listed for %s and %s", a, other.id, p.SPIFFEID)
			}
			snap.peers[a] = peerRoute{id: p.SPIFFEID, tunnel: net.JoinHostPort(a.String(), port), transports: p.Transports}
		}
	}
	if err := snap.addEntries(doc); err != nil {
		return nil, err
	}
	if doc.Bundle != nil {
		var err error
		if snap.bundle, err = ParseBundle(doc.Bundle); err != nil {
			return nil, fmt.Errorf("malformed directory: %w", err)
		}
		snap.bundleVersion = doc.Bundle.Version
	}
	return snap, nil
}

// addEntries adds doc's registration entries to s: the list, sorted by ID, and the
// agents with a port by the addresses of their host's proxy. A malformed entry (no ID
// or host, an ID listed twice, a port of a host listed twice) refuses the document,
// as a malformed peer does: the CA validates every entry.
func (s *State) addEntries(doc *DirectoryDocument) error {
	if len(doc.Entries) == 0 {
		return nil
	}
	entries := slices.SortedFunc(slices.Values(doc.Entries), CompareEntries)
	byHost := make(map[spiffeid.ID]map[uint16]spiffeid.ID)
	for i, e := range entries {
		switch {
		case e.ID.IsZero() || e.Host.IsZero():
			return fmt.Errorf("malformed directory: entry %d has no id or no host", i)
		case i > 0 && entries[i-1].ID == e.ID:
			return fmt.Errorf("malformed directory: entry %s listed twice", e.ID)
		case e.Port == 0:
			continue
		}
		ports := byHost[e.Host]
		if ports == nil {
			ports = make(map[uint16]spiffeid.ID)
			byHost[e.Host] = ports
		}
		if other, dup := ports[e.Port]; dup {
			return fmt.Errorf("malformed directory: port %d of %s registered to %s and %s", e.Port, e.Host, other, e.ID)
		}
		ports[e.Port] = e.ID
	}
	s.entries = entries
	if len(byHost) == 0 {
		return nil
	}
	s.agents = make(map[netip.Addr]map[uint16]spiffeid.ID)
	for _, p := range doc.Peers {
		ports := byHost[p.SPIFFEID]
		if ports == nil {
			continue
		}
		for _, a := range p.Addresses {
			// This proxy's own entry was not checked with the others' (NewState
			// leaves it out of the routes); its agents are still listed.
			if !a.IsValid() || CheckAdvertisable(a) != nil {
				return fmt.Errorf("malformed directory: peer %s has an invalid address %q", p.SPIFFEID, a)
			}
			s.agents[a.Unmap()] = ports
		}
	}
	return nil
}

// Version is the directory version of s, 0 before the first one arrives.
func (s *State) Version() uint64 { return s.version }

// PeerFor returns the SPIFFE ID of the proxy at addr and the host:port of its tunnel
// listener, or ok false when no other proxy is registered there (this proxy's own
// addresses included). It allocates nothing.
func (s *State) PeerFor(addr netip.Addr) (id spiffeid.ID, tunnel string, ok bool) {
	r, ok := s.peers[addr.Unmap()]
	return r.id, r.tunnel, ok
}

// TransportsFor returns the tunnel transports the proxy at addr accepts, most preferred
// first (nil when no proxy is registered there). The slice is shared: do not modify it.
func (s *State) TransportsFor(addr netip.Addr) []string {
	return s.peers[addr.Unmap()].transports
}

// Peers is the number of addresses with a route.
func (s *State) Peers() int { return len(s.peers) }

// Entries returns the registration entries, sorted by ID (a copy; nil when there are
// none).
func (s *State) Entries() []Entry { return slices.Clone(s.entries) }

// SameEntries reports whether s and o hold the same registration entries.
func (s *State) SameEntries(o *State) bool { return slices.Equal(s.entries, o.entries) }

// AgentsAt returns the agents registered with a port, by port, to the host of the
// proxy that advertises addr (this proxy's own addresses included), or nil when there
// are none or no proxy advertises addr. The map is shared and read-only: callers must
// not modify it. It allocates nothing.
func (s *State) AgentsAt(addr netip.Addr) map[uint16]spiffeid.ID {
	return s.agents[addr.Unmap()]
}

// Rotation is the fleet rotation the directory announced, nil when none.
func (s *State) Rotation() *FleetRotation { return s.rotation }

// Bundle are the CA's roots the directory published (shared: do not modify them), nil
// when it published none.
func (s *State) Bundle() []*x509.Certificate { return s.bundle }

// BundleVersion names Bundle (BundleVersion of it), "" when there is none.
func (s *State) BundleVersion() string { return s.bundleVersion }

// AnchorRotation is the step of a rotation of the CA's trust anchors the directory
// published, nil when none. Shared: do not modify it.
func (s *State) AnchorRotation() *AnchorRotation { return s.anchor }

// DenyList is the verified deny-list in force, nil before the first one. The list is
// immutable and safe for concurrent use.
func (s *State) DenyList() *DenyList { return s.deny }

// WithDirectory returns a State with next's directory (routes, entries, rotation,
// bundle) and
// s's deny-list.
func (s *State) WithDirectory(next *State) *State {
	c := *next
	c.deny = s.deny
	return &c
}

// WithDenyList returns a State with s's directory and the deny-list l.
func (s *State) WithDenyList(l *DenyList) *State {
	c := *s
	c.deny = l
	return &c
}
