package policy_test

import (
	"errors"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/policy"
)

func TestRotationValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		in    policy.Rotation
		field string // "" means valid
	}{
		{name: "zero value is valid", in: policy.Rotation{}},
		{name: "explicit values", in: policy.Rotation{RenewFraction: 0.5, JitterFraction: 0.1, Overlap: time.Minute, RetryMin: time.Second, RetryMax: time.Minute}},
		{name: "negative renew fraction", in: policy.Rotation{RenewFraction: -0.1}, field: "renew_fraction"},
		{name: "renew fraction too large", in: policy.Rotation{RenewFraction: 0.95}, field: "renew_fraction"},
		{name: "jitter too large", in: policy.Rotation{JitterFraction: 0.6}, field: "jitter_fraction"},
		{name: "fractions sum to one", in: policy.Rotation{RenewFraction: 0.6, JitterFraction: 0.4}, field: "jitter_fraction"},
		{name: "negative overlap", in: policy.Rotation{Overlap: -time.Second}, field: "overlap"},
		{name: "retry max below min", in: policy.Rotation{RetryMin: time.Minute, RetryMax: time.Second}, field: "retry_max"},
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
	got := policy.Rotation{Overlap: time.Second}.WithDefaults()
	want := policy.Rotation{
		RenewFraction:  policy.DefaultRenewFraction,
		JitterFraction: policy.DefaultJitterFraction,
		Overlap:        time.Second,
		RetryMin:       policy.DefaultRetryMin,
		RetryMax:       policy.DefaultRetryMax,
	}
	if got != want {
		t.Fatalf("WithDefaults() = %+v, want %+v", got, want)
	}
}
