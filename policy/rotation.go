package policy

import "time"

// RotationPolicy says when a proxy renews its SVIDs and how long superseded ones stay usable.
// The zero value is valid and means the defaults documented on each field.
type RotationPolicy struct {
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

	// MaxHandshakes is the usage trigger: the current key is rotated once this many
	// handshakes were signed with it, bounding how much any one key signs. Zero (the
	// default) turns the trigger off.
	MaxHandshakes uint64 `yaml:"max_handshakes"`

	// DrainGrace is how long connections still authenticated by a superseded SVID get
	// once its overlap has ended, before they are closed and its key destroyed: no
	// connection outlives its credential by more than Overlap + DrainGrace. Default 10s
	// (zero takes the default: for an immediate close set 1ns); must not be negative.
	// A revoked or compromised credential gets no grace.
	DrainGrace time.Duration `yaml:"drain_grace"`

	// TicketKeyPeriod is how often the proxy replaces its TLS session-ticket key. Zero
	// (the default) means min(DefaultTicketKeyPeriod, half the SVID lifetime), which
	// only the proxy can compute, so WithDefaults leaves it zero; the proxy also caps
	// an explicit value at half the lifetime. Must not be negative.
	TicketKeyPeriod time.Duration `yaml:"ticket_key_period"`
}

// Defaults of Rotation.
const (
	DefaultRenewFraction  = 1.0 / 3
	DefaultJitterFraction = 1.0 / 20
	DefaultRetryMin       = 500 * time.Millisecond
	DefaultRetryMax       = 30 * time.Second
	DefaultDrainGrace     = 10 * time.Second
	// DefaultTicketKeyPeriod is the session-ticket key period when TicketKeyPeriod is
	// zero and the SVID lives at least twice as long.
	DefaultTicketKeyPeriod = time.Hour
)

// WithDefaults returns r with every zero field set to its default, except
// MaxHandshakes (zero means off) and TicketKeyPeriod (its default depends on the SVID).
func (r RotationPolicy) WithDefaults() RotationPolicy {
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
	if r.DrainGrace == 0 {
		r.DrainGrace = DefaultDrainGrace
	}
	return r
}

// Validate reports the first field of r (after defaults) that is out of range, as a
// *FieldError whose Field is relative to the rotation section ("renew_fraction").
func (r RotationPolicy) Validate() error {
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
	case r.DrainGrace < 0:
		return &FieldError{Field: "drain_grace", Reason: "must not be negative"}
	case r.TicketKeyPeriod < 0:
		return &FieldError{Field: "ticket_key_period", Reason: "must not be negative"}
	}
	return nil
}
