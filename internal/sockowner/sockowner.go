package sockowner

import (
	"fmt"
	"net/netip"
)

// UID returns the uid owning the TCP socket whose local address is local and whose
// remote address is remote, in the network namespace of the calling process (it must
// not be called from a thread moved to another namespace with setns(2)). To find the
// process on the other end of an accepted loopback connection c, ask for
// UID(c.RemoteAddr(), c.LocalAddr()).
//
// Addresses may be IPv4, IPv6 or IPv4-mapped IPv6 (as dual-stack sockets report IPv4
// peers); either form finds the socket. A link-local IPv6 address needs its zone. The
// uid is as seen from the caller's user namespace (the overflow uid, normally 65534,
// when it is not mapped there).
//
// Listening sockets never match, and sockets no process holds any more report
// ErrNotFound rather than the uid 0 the kernel shows for them, so a process that
// closes its end at once cannot pass its connection off as root's. UID is safe for
// concurrent use.
func UID(local, remote netip.AddrPort) (uint32, error) {
	q, err := newQuery(local, remote)
	if err != nil {
		return 0, err
	}
	return lookup(q)
}

// query is the socket asked for in canonical form: IPv4-mapped addresses unmapped and
// zones split off, so the kernel's answers can be compared with it directly.
type query struct {
	local, remote netip.AddrPort
	// zone is the IPv6 zone the caller gave, naming the interface a link-local
	// socket is bound to.
	zone string
	// mapped records that the caller gave IPv4-mapped addresses, which a dual-stack
	// socket may also be known by.
	mapped bool
}

func newQuery(local, remote netip.AddrPort) (query, error) {
	if !local.IsValid() || !remote.IsValid() {
		return query{}, fmt.Errorf("sockowner: invalid address pair %v, %v", local, remote)
	}
	l, r := local.Addr(), remote.Addr()
	q := query{
		local:  netip.AddrPortFrom(l.Unmap().WithZone(""), local.Port()),
		remote: netip.AddrPortFrom(r.Unmap().WithZone(""), remote.Port()),
		zone:   l.Zone(),
		mapped: l.Is4In6() || r.Is4In6(),
	}
	if q.zone == "" {
		q.zone = r.Zone()
	}
	// A connected TCP socket has two ports and one address family; nothing else
	// can be owned by a process, so don't ask the kernel.
	if q.local.Addr().Is4() != q.remote.Addr().Is4() || local.Port() == 0 || remote.Port() == 0 {
		return query{}, ErrNotFound
	}
	return q, nil
}
