package proxy

import (
	"context"
	"fmt"
	"net"
	"time"
)

// serveStrict refuses a plain connection that strict mode captured on its way
// to a meshed agent port: only tunnels from authenticated peers may reach
// agents. The refusal is audited with the client's address and the port it
// wanted, then the connection is closed without a byte read or written.
func (p *Proxy) serveStrict(ctx context.Context, conn net.Conn) {
	defer conn.Close()
	s := &setup{dir: Inbound, start: time.Now(), peerAddr: conn.RemoteAddr().String(), transport: transportNone}
	target := "unknown"
	if dst, err := origDst(conn); err == nil {
		target = dst.String()
	}
	s.dst = target
	_ = p.record(ctx, s, ReasonPlaintextRefused,
		fmt.Errorf("plain TCP to meshed %s from %s refused (strict mode)", target, s.peerAddr))
}
