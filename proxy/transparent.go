package proxy

import (
	"context"
	"fmt"
	"net"
)

// serveTransparent carries one connection that iptables REDIRECTed to the
// Outbound listener to its original destination. A connection that was not
// redirected has no destination to go to and is refused: carrying it
// anywhere would be a guess, and dialing our own address would loop.
func (p *Proxy) serveTransparent(ctx context.Context, agent net.Conn) {
	o, stop := p.newOutbound(ctx, agent, modeTransparent)
	defer stop()
	dst, err := origDst(agent)
	if err != nil {
		p.conclude(ctx, o, ReasonNoOriginalDst, err)
		return
	}
	// Without a REDIRECT, conntrack's original destination is the socket's
	// own address: someone connected to the Outbound port directly. (Zones
	// differ in form: numeric from the kernel, a name from net.)
	if local := addrPortOf(agent.LocalAddr()); dst.Port() == local.Port() &&
		dst.Addr().WithZone("") == local.Addr().WithZone("") {
		p.conclude(ctx, o, ReasonNoOriginalDst,
			fmt.Errorf("%w: connection to %s was not redirected", ErrNoOriginalDst, local))
		return
	}
	if !p.fromThisHost(ctx, o) {
		return
	}
	// The agent's socket still points at the original destination.
	if !p.attribute(ctx, o, dst) {
		return
	}
	p.capture(ctx, o, dst)
}
