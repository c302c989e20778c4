package rotator

import "errors"

var (
	// ErrNoSVID means no SVID has been obtained yet.
	ErrNoSVID = errors.New("rotator: no svid yet")
	// ErrExpired means the current SVID has expired and no renewal has succeeded: the
	// identity must not be presented.
	ErrExpired = errors.New("rotator: svid expired")
	// ErrBadAnswer means the CA answered with a certificate that this identity must not
	// use (another key, another SPIFFE ID, already expired, or a chain outside the bundle).
	ErrBadAnswer = errors.New("rotator: refused ca answer")
	// ErrRevoked means the current SVID was revoked (see Rotator.Revoke) and no new one
	// has been obtained since: the identity must not be presented.
	ErrRevoked = errors.New("rotator: svid revoked")
	// ErrCompromised means the current SVID's key was declared compromised (Rotate with
	// Compromised) and no new SVID has been obtained since: it must not be presented.
	ErrCompromised = errors.New("rotator: svid key compromised")
	// ErrBadRequest means a RotateRequest names no known trigger or no initiator, or
	// SetBundle was given an unusable bundle.
	ErrBadRequest = errors.New("rotator: bad rotate request")
	// ErrStopped means Run has returned: nothing rotates any more.
	ErrStopped = errors.New("rotator: not running")
	// ErrEnrolmentRefused wraps the error of an enrolment the CA refused for good: its
	// bootstrap token was used already, has expired, or none is configured. Retries
	// read the token again, so writing a new one (agentmesh token) is what ends it.
	ErrEnrolmentRefused = errors.New("rotator: enrolment refused; a new bootstrap token is needed")
	// ErrKeyDestroyed is returned when signing with a key after KeyStore.Destroy.
	ErrKeyDestroyed = errors.New("rotator: key destroyed")
)

// permanent reports whether err says that repeating the same call cannot succeed; the
// CA client marks such errors with a Permanent method.
func permanent(err error) bool {
	var p interface{ Permanent() bool }
	return errors.As(err, &p) && p.Permanent()
}
