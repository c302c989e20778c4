package proxy

import (
	"errors"
	"strings"
	"testing"
)

// TestConfigValidate: Validate refuses, without opening anything, what New refuses.
func TestConfigValidate(t *testing.T) {
	t.Parallel()
	err := Config{}.Validate()
	if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "ID is required") {
		t.Fatalf("Validate() of an empty Config = %v, want ID required", err)
	}
	if _, newErr := New(Config{}); newErr == nil || newErr.Error() != err.Error() {
		t.Fatalf("New: %v, Validate: %v; want the same refusal", newErr, err)
	}
}
