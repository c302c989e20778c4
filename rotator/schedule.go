package rotator

import (
	"time"

	"github.com/cenkalti/backoff/v5"

	"github.com/agentmesh/agentmesh/policy"
)

// RenewAt returns when a certificate valid from notBefore to notAfter should be renewed:
// when p.RenewFraction of its lifetime remains, brought forward by jitter (in [0, 1))
// times p.JitterFraction of the lifetime. p must have its defaults applied.
//
// A notBefore in the future (the CA's clock ahead of ours) only shortens the lifetime
// used for the computation, never moves renewal past notAfter.
func RenewAt(notBefore, notAfter time.Time, p policy.RotationPolicy, jitter float64) time.Time {
	lifetime := notAfter.Sub(notBefore)
	if lifetime <= 0 {
		return notAfter
	}
	early := time.Duration(float64(lifetime) * (p.RenewFraction + jitter*p.JitterFraction))
	return notAfter.Add(-early)
}

// Backoff returns the wait before retry number attempt (1 for the first retry): capped
// exponential growth from p.RetryMin to p.RetryMax with full jitter, u in [0, 1).
// p must have its defaults applied.
//
// The library's exponential backoff gives the ceiling; its own randomisation stays off
// because it is not full jitter (a factor r spreads the wait over [1-r, 1+r] times the
// ceiling, so past RetryMax) and it draws from the global source, not from u.
func Backoff(attempt int, p policy.RotationPolicy, u float64) time.Duration {
	b := backoff.ExponentialBackOff{InitialInterval: p.RetryMin, Multiplier: 2, MaxInterval: p.RetryMax}
	ceiling := b.NextBackOff()
	for i := 1; i < attempt && ceiling < p.RetryMax; i++ {
		ceiling = b.NextBackOff()
	}
	ceiling = min(ceiling, p.RetryMax)
	return time.Duration(u * float64(ceiling))
}

// expired reports whether a certificate whose NotAfter is notAfter is no longer valid at
// now. RFC 5280 validity includes the NotAfter second itself, as crypto/x509 does.
func expired(notAfter, now time.Time) bool {
	return now.After(notAfter)
}
