package rotator

import (
	"time"

	"github.com/agentmesh/agentmesh/policy"
)

// RenewAt returns when a certificate valid from notBefore to notAfter should be renewed:
// when p.RenewFraction of its lifetime remains, brought forward by jitter (in [0, 1))
// times p.JitterFraction of the lifetime. p must have its defaults applied.
//
// A notBefore in the future (the CA's clock ahead of ours) only shortens the lifetime
// used for the computation, never moves renewal past notAfter.
func RenewAt(notBefore, notAfter time.Time, p policy.Rotation, jitter float64) time.Time {
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
func Backoff(attempt int, p policy.Rotation, u float64) time.Duration {
	ceiling := p.RetryMin
	for i := 1; i < attempt && ceiling < p.RetryMax; i++ {
		ceiling *= 2
	}
	ceiling = min(ceiling, p.RetryMax)
	return time.Duration(u * float64(ceiling))
}

// expired reports whether a certificate whose NotAfter is notAfter is no longer valid at
// now. RFC 5280 validity includes the NotAfter second itself, as crypto/x509 does.
func expired(notAfter, now time.Time) bool {
	return now.After(notAfter)
}
