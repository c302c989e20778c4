package rotator

import (
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/policy"
)

func TestRenewAt(t *testing.T) {
	t.Parallel()
	p := policy.RotationPolicy{}.WithDefaults()
	base := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name      string
		notBefore time.Time
		lifetime  time.Duration
		jitter    float64
		want      time.Time
	}{
		{name: "one minute, no jitter", notBefore: base, lifetime: time.Minute, want: base.Add(40 * time.Second)},
		{name: "one minute, max jitter", notBefore: base, lifetime: time.Minute, jitter: 1, want: base.Add(37 * time.Second)},
		{name: "five minutes, half jitter", notBefore: base, lifetime: 5 * time.Minute, jitter: 0.5, want: base.Add(200*time.Second - 7500*time.Millisecond)},
		{name: "ninety days, no jitter", notBefore: base, lifetime: 90 * 24 * time.Hour, want: base.Add(60 * 24 * time.Hour)},
		{name: "ninety days, max jitter", notBefore: base, lifetime: 90 * 24 * time.Hour, jitter: 1, want: base.Add(60*24*time.Hour - 108*time.Hour)},
		{name: "notBefore in the future (clock skew)", notBefore: base.Add(time.Hour), lifetime: 3 * time.Hour, want: base.Add(3 * time.Hour)},
		{name: "zero lifetime renews at notAfter", notBefore: base, lifetime: 0, want: base},
		{name: "inverted validity renews at notAfter", notBefore: base, lifetime: -time.Minute, want: base.Add(-time.Minute)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got := RenewAt(tc.notBefore, tc.notBefore.Add(tc.lifetime), p, tc.jitter)
			if !got.Equal(tc.want) {
				t.Fatalf("RenewAt = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestRenewAtBounds checks, over the whole jitter range, that renewal never comes later
// than a third of the lifetime before expiry nor earlier than that plus a twentieth.
func TestRenewAtBounds(t *testing.T) {
	t.Parallel()
	p := policy.RotationPolicy{}.WithDefaults()
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, lifetime := range []time.Duration{time.Minute, 5 * time.Minute, time.Hour, 90 * 24 * time.Hour} {
		na := nb.Add(lifetime)
		latest := na.Add(-lifetime / 3)
		earliest := latest.Add(-lifetime / 20)
		for j := 0.0; j < 1; j += 0.01 {
			got := RenewAt(nb, na, p, j)
			if got.After(latest.Add(time.Microsecond)) || got.Before(earliest.Add(-time.Microsecond)) {
				t.Fatalf("lifetime %v jitter %.2f: RenewAt = %v outside [%v, %v]", lifetime, j, got, earliest, latest)
			}
		}
	}
}

// TestBackoffMinAboveMax: a RetryMin over RetryMax waits RetryMax from the first retry.
func TestBackoffMinAboveMax(t *testing.T) {
	t.Parallel()
	p := policy.RotationPolicy{RetryMin: time.Minute, RetryMax: 10 * time.Second}.WithDefaults()
	for _, attempt := range []int{1, 2, 7} {
		if got := Backoff(attempt, p, 1); got != 10*time.Second {
			t.Fatalf("Backoff(%d) = %v, want RetryMax 10s", attempt, got)
		}
	}
}

func TestBackoff(t *testing.T) {
	t.Parallel()
	p := policy.RotationPolicy{RetryMin: time.Second, RetryMax: 30 * time.Second}.WithDefaults()
	tests := []struct {
		name    string
		attempt int
		u       float64
		want    time.Duration
	}{
		{name: "first retry, full", attempt: 1, u: 1, want: time.Second},
		{name: "first retry, zero jitter draw", attempt: 1, u: 0, want: 0},
		{name: "third retry doubles twice", attempt: 3, u: 1, want: 4 * time.Second},
		{name: "half draw", attempt: 3, u: 0.5, want: 2 * time.Second},
		{name: "capped", attempt: 10, u: 1, want: 30 * time.Second},
		{name: "huge attempt stays capped", attempt: 1 << 20, u: 1, want: 30 * time.Second},
		{name: "attempt zero is treated as first", attempt: 0, u: 1, want: time.Second},
		{name: "cap reached between doublings", attempt: 6, u: 1, want: 30 * time.Second},
		{name: "last doubling under the cap", attempt: 5, u: 1, want: 16 * time.Second},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := Backoff(tc.attempt, p, tc.u); got != tc.want {
				t.Fatalf("Backoff(%d, %v) = %v, want %v", tc.attempt, tc.u, got, tc.want)
			}
		})
	}
}

// TestExpiredEdge pins the ASN.1 one-second edge: a certificate is valid during its
// NotAfter second and invalid right after it.
func TestExpiredEdge(t *testing.T) {
	t.Parallel()
	na := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name string
		now  time.Time
		want bool
	}{
		{name: "one second before", now: na.Add(-time.Second), want: false},
		{name: "at NotAfter", now: na, want: false},
		{name: "one nanosecond after", now: na.Add(time.Nanosecond), want: true},
		{name: "one second after", now: na.Add(time.Second), want: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := expired(na, tc.now); got != tc.want {
				t.Fatalf("expired(%v, %v) = %v, want %v", na, tc.now, got, tc.want)
			}
		})
	}
}
