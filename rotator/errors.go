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
)

// permanent reports whether err says that repeating the same call cannot succeed; the
// CA client marks such errors with a Permanent method.
func permanent(err error) bool {
	var p interface{ Permanent() bool }
	return errors.As(err, &p) && p.Permanent()
}
