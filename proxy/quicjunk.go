package proxy

import (
	"context"
	"sync/atomic"

	"github.com/quic-go/quic-go/qlog"
	"github.com/quic-go/quic-go/qlogwriter"
)

// Datagrams on the quic port that never become a connection (docs/limits.md). quic-go
// asks the proxy about a connection only when a well-formed Initial arrives
// (Transport.ConnContext); what it refuses before that it drops without state. Those
// drops are refusals before authentication too, so they are counted and aggregated like
// the others, through the two places quic-go reports them:
//
//   - datagrams that are not QUIC at all (the first two bits clear) are handed to
//     Transport.ReadNonQUICPacket, with their source address (readNonQUIC);
//   - every other datagram quic-go drops before a connection exists is a
//     Transport.Tracer event (junkTrace). Those events carry no address, so they are
//     aggregated under the source "unknown". (Version Negotiation is off, so another
//     version is such a drop too.)
//
// A well-formed Initial gets a connection and its setup (quicConnContext): when its
// handshake fails, even before a ClientHello was read, watchQUICHandshake counts it
// under its source like a failed TLS handshake.
//
// The cost per datagram is the aggregator's (a map update under a lock), never a record.

// nonQUICBuffer is where readNonQUIC copies a datagram it only counts.
const nonQUICBuffer = 64

// queueNonQUIC makes quic-go queue non-QUIC datagrams from now on: until the first
// ReadNonQUICPacket it drops them unseen, and readNonQUIC starts only with Run.
func (p *Proxy) queueNonQUIC() {
	// A done context: the call only switches the queue on, nothing is in it yet.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, _, _ = p.quicTr.ReadNonQUICPacket(ctx, nil)
}

// readNonQUIC counts the non-QUIC datagrams quic-go hands over until ctx is done or the
// transport closes. quic-go queues up to 32 and drops the rest, which junkTrace counts.
func (p *Proxy) readNonQUIC(ctx context.Context) {
	var buf [nonQUICBuffer]byte
	for {
		_, addr, err := p.quicTr.ReadNonQUICPacket(ctx, buf[:])
		if err != nil {
			return
		}
		p.refuseEarly(Inbound, addr.String(), TransportQUIC, ReasonQUICInvalid)
	}
}

// junkTrace is the quic.Transport's Tracer: it counts the datagrams quic-go refuses
// before any connection exists. Events of connections go to their own traces.
type junkTrace struct {
	p *Proxy
	// ready is set at the end of New: quic-go receives from Listen on, before the
	// metrics exist. What arrives in between is not counted.
	ready atomic.Bool
}

func (t *junkTrace) RecordEvent(e qlogwriter.Event) {
	if !t.ready.Load() {
		return
	}
	switch ev := e.(type) {
	case qlog.PacketDropped:
		reason := ReasonQUICInvalid
		if ev.Trigger == qlog.PacketDropDOSPrevention {
			reason = ReasonQUICOverload
		}
		t.p.refuseEarly(Inbound, "", TransportQUIC, reason)
	}
}

func (t *junkTrace) Close() error { return nil }
