package proxy

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TestMuxLimits: a pooled connection's usable time is the earliest of its
// maximum lifetime and the earlier NotAfter less the margin (at most half of
// the validity left), and the receiving side's hard limit is the earlier
// NotAfter itself.
func TestMuxLimits(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name          string
		lifetime      time.Duration
		local, peer   time.Time
		wantUsable    time.Time
		wantExpires   time.Time
		wantEndReason string
	}{
		{name: "lifetime_first", lifetime: time.Hour, local: t0.Add(24 * time.Hour), peer: t0.Add(48 * time.Hour),
			wantUsable: t0.Add(time.Hour), wantExpires: t0.Add(24 * time.Hour), wantEndReason: poolEndMaxLifetime},
		{name: "peer_expires_first", lifetime: time.Hour, local: t0.Add(24 * time.Hour), peer: t0.Add(10 * time.Minute),
			wantUsable: t0.Add(10*time.Minute - muxExpiryMargin), wantExpires: t0.Add(10 * time.Minute), wantEndReason: poolEndCredential},
		{name: "local_expires_first", lifetime: time.Hour, local: t0.Add(5 * time.Minute), peer: t0.Add(10 * time.Minute),
			wantUsable: t0.Add(5*time.Minute - muxExpiryMargin), wantExpires: t0.Add(5 * time.Minute), wantEndReason: poolEndCredential},
		{name: "margin_capped_at_half_the_validity_left", lifetime: time.Hour, local: t0.Add(time.Hour), peer: t0.Add(time.Second),
			wantUsable: t0.Add(500 * time.Millisecond), wantExpires: t0.Add(time.Second), wantEndReason: poolEndCredential},
		{name: "already_expired", lifetime: time.Hour, local: t0.Add(time.Hour), peer: t0.Add(-time.Second),
			wantUsable: t0.Add(-time.Second), wantExpires: t0.Add(-time.Second), wantEndReason: poolEndCredential},
		{name: "ten_second_svid", lifetime: time.Hour, local: t0.Add(time.Hour), peer: t0.Add(10 * time.Second),
			wantUsable: t0.Add(8 * time.Second), wantExpires: t0.Add(10 * time.Second), wantEndReason: poolEndCredential},
		{name: "margin_below_four_seconds_left", lifetime: time.Hour, local: t0.Add(time.Hour), peer: t0.Add(2*time.Second + 999*time.Millisecond),
			wantUsable: t0.Add(1499500 * time.Microsecond), wantExpires: t0.Add(2*time.Second + 999*time.Millisecond), wantEndReason: poolEndCredential},
		{name: "no_certificates_known", lifetime: time.Minute,
			wantUsable: t0.Add(time.Minute), wantEndReason: poolEndMaxLifetime},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			l := newMuxLimits(t0, tc.lifetime, tc.local, tc.peer)
			if !l.usableUntil.Equal(tc.wantUsable) || !l.expires.Equal(tc.wantExpires) || l.endReason != tc.wantEndReason {
				t.Fatalf("limits = %+v, want usable until %s, expires %s, reason %s", l, tc.wantUsable, tc.wantExpires, tc.wantEndReason)
			}
			if l.usableAt(l.usableUntil) || !l.usableAt(l.usableUntil.Add(-time.Nanosecond)) {
				t.Errorf("usableAt is not exclusive of %s", l.usableUntil)
			}
			if !l.expires.IsZero() && (!l.expiredAt(l.expires) || l.expiredAt(l.expires.Add(-time.Nanosecond))) {
				t.Errorf("expiredAt does not start at %s", l.expires)
			}
			if l.expires.IsZero() && l.expiredAt(t0.Add(100*365*24*time.Hour)) {
				t.Error("expired without a certificate")
			}
		})
	}
}

// fakeMux stands in for a transport (h2, quic) inside a synctest bubble,
// where real sockets cannot run: it records what the pool asks of it and,
// as the transports do, reports the end of the connection.
type fakeMux struct {
	m        *muxConn
	goaways  atomic.Int32
	closedAt atomic.Pointer[time.Time]
}

func (f *fakeMux) open(context.Context, uint16) (outStream, error) { return nil, errMuxUnusable }
func (f *fakeMux) goaway()                                         { f.goaways.Add(1) }
func (f *fakeMux) bind(m *muxConn)                                 { f.m = m }
func (f *fakeMux) close(bool) {
	now := time.Now()
	f.closedAt.Store(&now)
	f.m.closed()
}

// timedProxy is a Proxy with only what pooled connections use.
func timedProxy(t *testing.T, cfg Config) *Proxy {
	t.Helper()
	cfg.ID = spiffeid.RequireFromString("spiffe://example.org/host/a")
	p := &Proxy{cfg: cfg.withDefaults()}
	var err error
	if p.metrics, err = newMetrics(nil); err != nil {
		t.Fatal(err)
	}
	p.pool = pool{p: p, conns: make(map[poolKey][]*muxConn),
		current: make(map[spiffeid.ID]string)}
	return p
}

// timedMux registers a pooled connection of dir whose certificates end at
// the given times.
func timedMux(t *testing.T, p *Proxy, dir Direction, localNotAfter, peerNotAfter time.Time) (*muxConn, *fakeMux) {
	t.Helper()
	f := &fakeMux{}
	s := &setup{dir: dir, transport: TransportH2, connID: newConnID(), localSerial: "1", peerSerial: "2",
		localNotAfter: localNotAfter, peerNotAfter: peerNotAfter}
	m := p.newMux(f, s, spiffeid.RequireFromString("spiffe://example.org/host/b"))
	f.bind(m)
	if dir == Outbound {
		m.key = poolKey{transport: TransportH2, local: "1"}
		p.pool.conns[m.key] = append(p.pool.conns[m.key], m)
	}
	if reason := m.register(); reason != "" {
		t.Fatalf("register: %s", reason)
	}
	return m, f
}

// TestPoolTimers: in a synctest bubble, a pooled connection drains exactly
// when its usable time ends (2 s before the peer's NotAfter; outbound it
// then closes a linger later, inbound the peer is asked to go away), and the
// reaper closes an idle connection within a tick of PoolIdleTimeout, the
// receiving side muxIdleGrace later.
func TestPoolTimers(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		const idle = 20 * time.Second
		p := timedProxy(t, Config{PoolIdleTimeout: idle, PoolMaxLifetime: time.Hour})
		ctx, cancel := context.WithCancel(t.Context())
		var reaper sync.WaitGroup
		reaper.Go(func() { p.reap(ctx) })
		defer func() { cancel(); reaper.Wait() }()

		start := time.Now()
		far := start.Add(24 * time.Hour)
		short, shortImpl := timedMux(t, p, Outbound, far, start.Add(10*time.Second))
		shortIn, shortInImpl := timedMux(t, p, Inbound, start.Add(10*time.Second), far)
		_, idleOut := timedMux(t, p, Outbound, far, far)
		idleIn, idleInImpl := timedMux(t, p, Inbound, far, far)

		// A stream just before the end, none at it.
		time.Sleep(8*time.Second - time.Nanosecond) //nolint:forbidigo // synctest: advances the bubble's clock
		if ok, _ := short.reserve(); !ok {
			t.Fatal("no stream 2 s before the peer's NotAfter")
		}
		short.release()
		time.Sleep(time.Nanosecond) //nolint:forbidigo // synctest: advances the bubble's clock
		synctest.Wait()
		if ok, _ := short.reserve(); ok {
			t.Fatal("a stream 2 s before the peer's NotAfter")
		}
		if shortInImpl.goaways.Load() != 1 {
			t.Error("the inbound connection did not ask its peer to go away at its end")
		}
		if got := shortIn.admit(time.Now()); got != "" {
			t.Errorf("inbound refuses before NotAfter: %s", got)
		}
		if got := shortIn.admit(start.Add(10 * time.Second)); got != ReasonCredentialExpired {
			t.Errorf("inbound admits at NotAfter: %q", got)
		}
		time.Sleep(muxCloseLinger) //nolint:forbidigo // synctest: advances the bubble's clock
		synctest.Wait()
		if at := shortImpl.closedAt.Load(); at == nil || !at.Equal(start.Add(8*time.Second+muxCloseLinger)) {
			t.Errorf("drained connection closed at %v, want %s after the start", at, 8*time.Second+muxCloseLinger)
		}

		// Idle: the reaper ticks every idle/4.
		time.Sleep(time.Until(start.Add(idle + idle/4))) //nolint:forbidigo // synctest: advances the bubble's clock
		synctest.Wait()
		if at := idleOut.closedAt.Load(); at == nil || at.Sub(start) > idle+idle/4 {
			t.Fatalf("idle outbound connection closed at %v, want within %s", at, idle+idle/4)
		}
		if idleInImpl.closedAt.Load() != nil {
			t.Fatal("the receiving side closed its idle connection before the dialing side's grace")
		}
		time.Sleep(muxIdleGrace) //nolint:forbidigo // synctest: advances the bubble's clock
		synctest.Wait()
		if at := idleInImpl.closedAt.Load(); at == nil || at.Sub(start) > idle+muxIdleGrace+idle/4 {
			t.Fatalf("idle inbound connection closed at %v", at)
		}
		if idleIn.limits.endReason != poolEndMaxLifetime {
			t.Errorf("end reason %s", idleIn.limits.endReason)
		}
		for _, l := range []struct {
			dir    Direction
			reason string
			want   float64
		}{{Outbound, poolEndCredential, 1}, {Inbound, poolEndCredential, 1}, {Outbound, poolEndIdle, 1}, {Inbound, poolEndIdle, 2}} {
			var got dto.Metric
			if err := p.metrics.poolEnded.WithLabelValues(string(l.dir), TransportH2, l.reason).Write(&got); err != nil {
				t.Fatal(err)
			}
			if got.GetCounter().GetValue() != l.want {
				t.Errorf("pool_ended{%s,%s} = %v, want %v", l.dir, l.reason, got.GetCounter().GetValue(), l.want)
			}
		}
	})
}
