package proxy

import (
	"errors"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TestConfigValidate: Validate refuses, without opening anything, the settings New
// refuses, and leaves the components New is given to New.
func TestConfigValidate(t *testing.T) {
	t.Parallel()
	err := Config{}.Validate()
	if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "ID is required") {
		t.Fatalf("Validate() of an empty Config = %v, want ID required", err)
	}
	if _, newErr := New(Config{}); newErr == nil || newErr.Error() != err.Error() {
		t.Fatalf("New: %v, Validate: %v; want the same refusal", newErr, err)
	}
	id := spiffeid.RequireFromString("spiffe://example.org/host/a")
	peer := spiffeid.RequireFromString("spiffe://example.org/host/b")
	if err := (Config{ID: id}).Validate(); err != nil {
		t.Fatalf("Validate() without Credentials = %v, want nil", err)
	}
	twice := Config{ID: id, Services: []Service{{Port: 80, Allow: []spiffeid.ID{peer}}, {Port: 80, Allow: []spiffeid.ID{peer}}}}
	if err := twice.Validate(); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "listed twice") {
		t.Fatalf("Validate() of a service listed twice = %v", err)
	}
	if _, err := New(Config{ID: id}); err == nil || !strings.Contains(err.Error(), "Credentials is required") {
		t.Fatalf("New without Credentials: %v", err)
	}
}
