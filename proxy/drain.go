package proxy

import (
	"context"
	"log/slog"
	"time"
)

// Drain closes every established connection whose local credential has this
// serial (ConnInfo.LocalSerial) once grace has passed, auditing each closure
// with reason "drained" (audit.Connection), and returns how many it closed.
// Connections that end by themselves within grace are not touched. It blocks
// until then; if ctx ends first it closes the rest at once. A grace <= 0
// closes at once. New handshakes never use a superseded credential (the
// rotator no longer presents it), and a ticket issued under it no longer
// resumes (tickets are bound to the certificate they were issued under).
//
// The rotator calls it when a credential's overlap ends, before destroying
// its key, so no connection outlives its credential by more than overlap +
// grace. A connection whose setup picked the credential before the rotation
// but registers only after the closing walk is closed as it registers, for
// HandshakeTimeout + DialTimeout after the walk: that covers every setup
// step except a blocking audit log. Connections of a passthrough (serial "")
// are never drained. agentmesh_proxy_connections_drained_total counts the
// closures. A stream of a pooled connection (h2, quic) is a connection like
// any other here; the pooled connections our certificate authenticated are
// closed along with their streams. Safe for concurrent use.
func (p *Proxy) Drain(ctx context.Context, serial string, grace time.Duration) int {
	if serial == "" {
		return 0
	}
	if grace > 0 {
		timer := time.NewTimer(grace)
		select {
		case <-ctx.Done():
		case <-timer.C:
		}
		timer.Stop()
	}

	now := time.Now()
	var victims []*tunnelConn
	p.registry.mu.Lock()
	for s, until := range p.registry.drained {
		if !now.Before(until) {
			delete(p.registry.drained, s)
		}
	}
	if p.registry.drained == nil {
		p.registry.drained = make(map[string]time.Time)
	}
	p.registry.drained[serial] = now.Add(p.cfg.HandshakeTimeout + p.cfg.DialTimeout)
	for _, c := range p.registry.conns {
		if c.info.LocalSerial == serial {
			victims = append(victims, c)
		}
	}
	var muxes []*muxConn
	for m := range p.registry.muxes {
		if m.localSerial == serial {
			muxes = append(muxes, m)
		}
	}
	p.registry.mu.Unlock()

	closed := 0
	for _, c := range victims {
		// A connection that ended meanwhile (end: first caller wins)
		// keeps its own reason and is not counted.
		if c.drain() {
			closed++
		}
	}
	// Every stream of these pooled connections was on serial, and has just
	// been closed: the connections go too (h2 with a GOAWAY).
	for _, m := range muxes {
		m.close(true)
	}
	p.cfg.Logger.LogAttrs(ctx, slog.LevelInfo, "credential drained",
		slog.String(keyLocal, serial),
		slog.Duration(keyGrace, grace),
		slog.Int(keyClosed, closed))
	return closed
}
