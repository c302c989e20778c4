package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Which clients the proxy carries outbound, and where its client-facing
// listeners bind. The proxy lends its identity, and with passthrough its
// network position, to whoever it carries: so it carries only processes of
// this host (never a relay for the network), binds explicit and route
// listeners to loopback unless told otherwise, and listens for transparent
// capture on both loopbacks, where iptables and ip6tables REDIRECT.

// loopbackIfNoHost gives a listen address without a host ("":port, as
// ":15080") the IPv4 loopback, so that a listener lending the host's
// identity is reachable from the network only when the configuration names
// a non-loopback address (0.0.0.0:15080, [::]:15080) on purpose.
func loopbackIfNoHost(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || host != "" {
		return addr // validate reports a malformed one
	}
	return net.JoinHostPort("127.0.0.1", port)
}

// listenOtherLoopback returns a listener on the other family's loopback at
// the port of ln when ln is bound to a loopback address, nil otherwise or
// when this host has no such loopback (IPv6 disabled): REDIRECT sends IPv4
// to 127.0.0.1 and IPv6 to ::1, and transparent capture must receive both.
func listenOtherLoopback(ln net.Listener) (net.Listener, error) {
	a := addrPortOf(ln.Addr())
	var other netip.Addr
	switch {
	case a.Addr().Is4() && a.Addr().IsLoopback():
		other = netip.IPv6Loopback()
	case a.Addr().Is6() && a.Addr().IsLoopback():
		other = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	default:
		return nil, nil
	}
	alt, err := net.Listen("tcp", netip.AddrPortFrom(other, a.Port()).String())
	if errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listen outbound %s: %w", netip.AddrPortFrom(other, a.Port()), err)
	}
	return alt, nil
}

// fromThisHost refuses (reason not_local, audited and counted) a client of
// a capture listener whose address is not one of this host's: transparent
// and explicit capture carry connections to any destination the client
// names, passthrough included, and must never do that for the network. It
// reports whether o may go on.
func (p *Proxy) fromThisHost(ctx context.Context, o *outbound) bool {
	client := addrPortOf(o.agent.RemoteAddr())
	if p.hostAddrs.has(client.Addr(), time.Now()) {
		return true
	}
	p.conclude(ctx, o, ReasonNotLocal, fmt.Errorf("%w: %s", ErrNotLocal, client))
	return false
}

// hostAddrSet is the set of this host's addresses, listed from the
// interfaces and listed again when an address is missing (an address added
// since), at most once per hostAddrsRefresh, so that a remote client
// cannot make every connection list the interfaces.
type hostAddrSet struct {
	snap atomic.Pointer[hostAddrSnapshot]
	mu   sync.Mutex // one listing at a time
}

type hostAddrSnapshot struct {
	addrs map[netip.Addr]struct{}
	at    time.Time
}

const hostAddrsRefresh = time.Second

// has reports whether a is an address of this host. Loopback always is; an
// address the interfaces cannot be listed to confirm is not (fail closed).
func (s *hostAddrSet) has(a netip.Addr, now time.Time) bool {
	a = a.Unmap().WithZone("")
	if !a.IsValid() {
		return false
	}
	if a.IsLoopback() {
		return true
	}
	snap := s.snap.Load()
	if snap != nil {
		if _, ok := snap.addrs[a]; ok {
			return true
		}
		if now.Sub(snap.at) < hostAddrsRefresh {
			return false
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if cur := s.snap.Load(); cur != snap && cur != nil {
		_, ok := cur.addrs[a] // listed by a concurrent call meanwhile
		return ok
	}
	next := &hostAddrSnapshot{addrs: map[netip.Addr]struct{}{}, at: now}
	ifaddrs, err := net.InterfaceAddrs()
	if err == nil {
		for _, ia := range ifaddrs {
			if n, ok := ia.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(n.IP); ok {
					next.addrs[ip.Unmap()] = struct{}{}
				}
			}
		}
	}
	s.snap.Store(next)
	_, ok := next.addrs[a]
	return ok
}
