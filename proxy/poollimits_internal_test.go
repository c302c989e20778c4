package proxy

import (
	"testing"
	"time"
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
