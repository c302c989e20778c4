package proxy

import (
	"context"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/agentmesh/agentmesh/audit"
)

// Refused pre-authentication attempts are aggregated (docs/limits.md): anyone who can reach
// the tunnel port can make them, as fast as the network allows, so one audit record and one
// log line each would let a flood fill the disk. They are counted per source address and
// written as one audit.Refusals record per source per RefusalInterval; at most
// RefusalSources sources are kept per interval, the rest share one record (source "other"),
// so the aggregator's memory and the records per interval are bounded whatever the flood.

// sourceOther is the Source of the record that holds the sources beyond the cap.
const sourceOther = "other"

// sourceUnknown is the Source of the record of attempts whose address is not known
// (QUIC datagrams quic-go drops: quicjunk.go).
const sourceUnknown = "unknown"

// maxRefusedPeers is how many presented certificates one record samples.
const maxRefusedPeers = 4

// preAuth reports whether an inbound refusal with reason happened before the peer was
// authenticated: nothing in it names a verified identity, so anyone can cause it.
func preAuth(reason Reason) bool {
	// Every reason is listed, so that a new one must be placed (exhaustive).
	switch reason {
	case ReasonNotTLS, ReasonTimeout, ReasonPeerClosed, ReasonHandshakeFailed, ReasonALPN,
		ReasonBadCertificate, ReasonCertExpired, ReasonUnknownAuthority, ReasonKeyUsage,
		ReasonChainTooLong, ReasonIDTooLong, ReasonMaxConnections, ReasonMaxHandshakes,
		ReasonAuditUnavailable, ReasonQUICInvalid, ReasonQUICOverload:
		return true
	case ReasonPeerNotAllowed, ReasonPeerMismatch, ReasonPortNotMeshed, ReasonBadRequest,
		ReasonUnsupported, ReasonTargetUnreachable, ReasonPeerUnreachable, ReasonPeerRefused,
		ReasonNoSVID, ReasonShutdown, ReasonPlaintextRefused, ReasonRevoked,
		ReasonRevocationStale, ReasonPolicyDenied, ReasonCredentialExpired, ReasonDrained,
		ReasonMaxStreams, ReasonPassthrough, ReasonUnknownDestination, ReasonNoOriginalDst, ReasonLoop,
		ReasonUnsupportedRequest, ReasonResolveFailed, ReasonUnattested, ReasonNotLocal:
		return false
	}
	return false
}

// refusals is the aggregator. Safe for concurrent use.
type refusals struct {
	max int // sources per interval, besides "other"

	mu      sync.Mutex
	sources map[netip.Addr]*audit.Refusals
	other   *audit.Refusals
}

func newRefusals(limit int) *refusals {
	return &refusals{max: limit, sources: make(map[netip.Addr]*audit.Refusals)}
}

// add counts one refused attempt from addr (host:port) at now. peer is the
// certificate it presented, zero for none.
func (r *refusals) add(dir Direction, addr, transport string, reason Reason, peer audit.RefusedPeer, now time.Time) {
	ip := sourceOf(addr)
	r.mu.Lock()
	defer r.mu.Unlock()
	e := r.sources[ip]
	if e == nil {
		if len(r.sources) < r.max {
			src := ip.String()
			if !ip.IsValid() {
				src = sourceUnknown
			}
			e = newRefusalsRecord(dir, src, now)
			r.sources[ip] = e
		} else {
			if r.other == nil {
				r.other = newRefusalsRecord(dir, sourceOther, now)
			}
			e = r.other
		}
	}
	e.Count++
	e.Last = now
	e.Reasons[string(reason)]++
	e.Transports[transport]++
	if peer.PeerSerial != "" || peer.PeerID != "" {
		samplePeer(e, peer)
	}
}

// samplePeer keeps peer in e unless e has its fill or the certificate already.
func samplePeer(e *audit.Refusals, peer audit.RefusedPeer) {
	if len(e.Peers) >= maxRefusedPeers {
		return
	}
	for _, p := range e.Peers {
		if p.PeerSerial == peer.PeerSerial && p.PeerID == peer.PeerID {
			return
		}
	}
	e.Peers = append(e.Peers, peer)
}

func newRefusalsRecord(dir Direction, source string, now time.Time) *audit.Refusals {
	return &audit.Refusals{Direction: string(dir), Source: source, First: now, Last: now,
		Reasons: make(map[string]uint64, 2), Transports: make(map[string]uint64, 1)}
}

// take returns the interval's records, "other" last, and starts a new interval.
func (r *refusals) take() []*audit.Refusals {
	r.mu.Lock()
	sources, other := r.sources, r.other
	r.sources, r.other = make(map[netip.Addr]*audit.Refusals, len(sources)), nil
	r.mu.Unlock()
	out := make([]*audit.Refusals, 0, len(sources)+1)
	for _, k := range sortedAddrs(sources) {
		out = append(out, sources[k])
	}
	if other != nil {
		out = append(out, other)
	}
	return out
}

func sortedAddrs(m map[netip.Addr]*audit.Refusals) []netip.Addr {
	keys := slices.Collect(maps.Keys(m))
	// By first attempt, so the records of an interval read in time order.
	slices.SortFunc(keys, func(a, b netip.Addr) int { return m[a].First.Compare(m[b].First) })
	return keys
}

// sourceOf is the IP of a host:port, unmapped; the zero Addr when it has none.
func sourceOf(addr string) netip.Addr {
	if ap, err := netip.ParseAddrPort(addr); err == nil {
		return ap.Addr().Unmap()
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	ip, _ := netip.ParseAddr(host)
	return ip.Unmap()
}

// refuseEarly counts and aggregates a connection refused before it was authenticated.
func (p *Proxy) refuseEarly(dir Direction, addr, transport string, reason Reason) {
	p.metrics.refused.WithLabelValues(string(reason)).Inc()
	p.refusals.add(dir, addr, transport, reason, audit.RefusedPeer{}, time.Now())
}

// flushRefusals writes the aggregated records every RefusalInterval, and once more when ctx
// is done so nothing counted is lost at shutdown. One Warn line per interval with refusals
// says how many there were: the log's rate is bounded too.
func (p *Proxy) flushRefusals(ctx context.Context) {
	t := time.NewTicker(p.cfg.RefusalInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			p.writeRefusals(context.WithoutCancel(ctx))
			return
		case <-t.C:
			p.writeRefusals(ctx)
		}
	}
}

func (p *Proxy) writeRefusals(ctx context.Context) {
	recs := p.refusals.take()
	if len(recs) == 0 {
		return
	}
	var attempts uint64
	reasons := make(map[string]uint64)
	lost := 0
	for _, r := range recs {
		attempts += r.Count
		for k, v := range r.Reasons {
			reasons[k] += v
		}
		if p.cfg.Audit == nil {
			continue
		}
		if err := p.cfg.Audit.Append(*r); err != nil {
			lost++
		}
	}
	level := slog.LevelWarn
	if lost > 0 {
		level = slog.LevelError
	}
	p.cfg.Logger.LogAttrs(ctx, level, "connection attempts refused before authentication",
		slog.Uint64(keyAttempts, attempts), slog.Int(keySources, len(recs)), slog.Any(keyReasons, reasons),
		slog.Int(keyUnrecorded, lost))
}
