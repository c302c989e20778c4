package policy

import "time"

// Rotation says when a proxy renews its SVIDs and how long superseded ones stay usable.
// The zero value is valid and means the defaults documented on each field.
type Rotation struct {
	// RenewFraction is the fraction of an SVID's lifetime that must still remain when
	// renewal starts. Default 1/3; valid range (0, 0.9].
	RenewFraction float64 `yaml:"renew_fraction"`

	// JitterFraction bounds the random amount, as a fraction of the lifetime, by which
	// renewal starts earlier so that a fleet issued together does not renew together.
	// Default 1/20; valid range [0, 0.5]; RenewFraction+JitterFraction must stay below 1.
	JitterFraction float64 `yaml:"jitter_fraction"`

	// Overlap is how long a superseded SVID stays in overlap after a rotation: no longer
	// presented in new handshakes, still the credential of the connections it
	// authenticated. Zero means until the superseded certificate expires. Never longer
	// than the certificate's own validity.
	Overlap time.Duration `yaml:"overlap"`

	// RetryMin and RetryMax bound the capped exponential backoff (with full jitter)
	// between failed renewals. Defaults 500ms and 30s. The rotator also never waits
	// past the current certificate's expiry.
	RetryMin time.Duration `yaml:"retry_min"`
	RetryMax time.Duration `yaml:"retry_max"`
}

// Defaults of Rotation.
const (
	DefaultRenewFraction  = 1.0 / 3
	DefaultJitterFraction = 1.0 / 20
	DefaultRetryMin       = 500 * time.Millisecond
	DefaultRetryMax       = 30 * time.Second
)

// WithDefaults returns r with every zero field set to its default.
func (r Rotation) WithDefaults() Rotation {
	if r.RenewFraction == 0 {
		r.RenewFraction = DefaultRenewFraction
	}
	if r.JitterFraction == 0 {
		r.JitterFraction = DefaultJitterFraction
	}
	if r.RetryMin == 0 {
		r.RetryMin = DefaultRetryMin
	}
	if r.RetryMax == 0 {
		r.RetryMax = DefaultRetryMax
	}
	return r
}

// Validate reports the first field of r (after defaults) that is out of range, as a
// *FieldError whose Field is relative to the rotation section ("renew_fraction").
func (r Rotation) Validate() error {
	r = r.WithDefaults()
	switch {
	case r.RenewFraction <= 0 || r.RenewFraction > 0.9:
		return &FieldError{Field: "renew_fraction", Reason: "must be in (0, 0.9]"}
	case r.JitterFraction < 0 || r.JitterFraction > 0.5:
		return &FieldError{Field: "jitter_fraction", Reason: "must be in [0, 0.5]"}
	case r.RenewFraction+r.JitterFraction >= 1:
		return &FieldError{Field: "jitter_fraction", Reason: "renew_fraction + jitter_fraction must be below 1"}
	case r.Overlap < 0:
		return &FieldError{Field: "overlap", Reason: "must not be negative"}
	case r.RetryMin < 0:
		return &FieldError{Field: "retry_min", Reason: "must not be negative"}
	case r.RetryMax < r.RetryMin:
		return &FieldError{Field: "retry_max", Reason: "must not be below retry_min"}
	}
	return nil
}
