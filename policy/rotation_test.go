package policy_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/agentmesh/agentmesh/policy"
)

func TestRotationValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		in    policy.RotationPolicy
		field string // "" means valid
	}{
		{name: "zero value is valid", in: policy.RotationPolicy{}},
		{name: "explicit values", in: policy.RotationPolicy{RenewFraction: 0.5, JitterFraction: 0.1, Overlap: time.Minute, RetryMin: time.Second, RetryMax: time.Minute}},
		{name: "negative renew fraction", in: policy.RotationPolicy{RenewFraction: -0.1}, field: "renew_fraction"},
		{name: "renew fraction too large", in: policy.RotationPolicy{RenewFraction: 0.95}, field: "renew_fraction"},
		{name: "jitter too large", in: policy.RotationPolicy{JitterFraction: 0.6}, field: "jitter_fraction"},
		{name: "fractions sum to one", in: policy.RotationPolicy{RenewFraction: 0.6, JitterFraction: 0.4}, field: "jitter_fraction"},
		{name: "negative overlap", in: policy.RotationPolicy{Overlap: -time.Second}, field: "overlap"},
		{name: "retry max below min", in: policy.RotationPolicy{RetryMin: time.Minute, RetryMax: time.Second}, field: "retry_max"},
		{name: "lifecycle fields", in: policy.RotationPolicy{MaxHandshakes: 1, DrainGrace: time.Nanosecond, TicketKeyPeriod: time.Minute}},
		{name: "usage trigger off", in: policy.RotationPolicy{MaxHandshakes: 0}},
		{name: "negative drain grace", in: policy.RotationPolicy{DrainGrace: -time.Nanosecond}, field: "drain_grace"},
		{name: "negative ticket key period", in: policy.RotationPolicy{TicketKeyPeriod: -time.Second}, field: "ticket_key_period"},
		// The first invalid field is reported, in declaration order.
		{name: "two invalid fields", in: policy.RotationPolicy{DrainGrace: -time.Second, TicketKeyPeriod: -time.Second}, field: "drain_grace"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := tc.in.Validate()
			if tc.field == "" {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			var fe *policy.FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("Validate() = %v, want *FieldError", err)
			}
			if fe.Field != tc.field {
				t.Fatalf("field = %q, want %q", fe.Field, tc.field)
			}
		})
	}
}

func TestRotationWithDefaults(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		in   policy.RotationPolicy
		want policy.RotationPolicy
	}{
		{
			name: "zero fields take defaults; usage and ticket period stay zero",
			in:   policy.RotationPolicy{Overlap: time.Second},
			want: policy.RotationPolicy{
				RenewFraction:  policy.DefaultRenewFraction,
				JitterFraction: policy.DefaultJitterFraction,
				Overlap:        time.Second,
				RetryMin:       policy.DefaultRetryMin,
				RetryMax:       policy.DefaultRetryMax,
				DrainGrace:     policy.DefaultDrainGrace,
			},
		},
		{
			name: "explicit values are kept",
			in:   policy.RotationPolicy{RenewFraction: 0.5, JitterFraction: 0.1, RetryMin: time.Second, RetryMax: time.Minute, MaxHandshakes: 1000, DrainGrace: time.Nanosecond, TicketKeyPeriod: 5 * time.Minute},
			want: policy.RotationPolicy{RenewFraction: 0.5, JitterFraction: 0.1, RetryMin: time.Second, RetryMax: time.Minute, MaxHandshakes: 1000, DrainGrace: time.Nanosecond, TicketKeyPeriod: 5 * time.Minute},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := tc.in.WithDefaults(); got != tc.want {
				t.Fatalf("WithDefaults() = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestRotationDefaultDrainGrace(t *testing.T) {
	t.Parallel()
	if got := (policy.RotationPolicy{}).WithDefaults().DrainGrace; got != 10*time.Second {
		t.Fatalf("default DrainGrace = %v, want 10s", got)
	}
}

// TestRotationYAML pins the field names an operator writes in the config file.
func TestRotationYAML(t *testing.T) {
	t.Parallel()
	const doc = "max_handshakes: 5000\ndrain_grace: 3s\nticket_key_period: 20m\noverlap: 1m\n"
	dec := yaml.NewDecoder(strings.NewReader(doc))
	dec.KnownFields(true)
	var got policy.RotationPolicy
	if err := dec.Decode(&got); err != nil {
		t.Fatalf("decode: %v", err)
	}
	want := policy.RotationPolicy{MaxHandshakes: 5000, DrainGrace: 3 * time.Second, TicketKeyPeriod: 20 * time.Minute, Overlap: time.Minute}
	if got != want {
		t.Fatalf("decoded %+v, want %+v", got, want)
	}
}
