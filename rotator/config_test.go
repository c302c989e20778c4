package rotator

import (
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/policy"
)

// TestConfigValidate: Validate refuses what New refuses, and New refuses it the same.
func TestConfigValidate(t *testing.T) {
	t.Parallel()
	iss := newIssuer(t, 0)
	foreign := testca.New(t, testca.WithTrustDomain(spiffeid.RequireTrustDomainFromString("other.org")))
	good := Config{ID: hostA, Issuer: iss, Bundle: iss.ca.Bundle()}
	tests := []struct {
		name string
		edit func(*Config)
		want string // "" for valid
	}{
		{name: "valid", edit: func(*Config) {}},
		{name: "no ID", edit: func(c *Config) { c.ID = spiffeid.ID{} }, want: "ID is required"},
		{name: "no issuer", edit: func(c *Config) { c.Issuer = nil }, want: "Issuer is required"},
		{name: "no bundle", edit: func(c *Config) { c.Bundle = nil }, want: "Bundle with at least one authority"},
		{name: "foreign bundle", edit: func(c *Config) { c.Bundle = foreign.Bundle() }, want: "not for the ID's trust domain"},
		{name: "bad policy", edit: func(c *Config) { c.Policy = policy.RotationPolicy{RenewFraction: 2} }, want: "renew_fraction"},
		{name: "state file in memory", edit: func(c *Config) { c.StateFile = "svid.json" }, want: "not rotator.MemoryKeys"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := good
			tc.edit(&cfg)
			err := cfg.Validate()
			_, newErr := New(cfg)
			if tc.want == "" {
				if err != nil || newErr != nil {
					t.Fatalf("Validate() = %v, New: %v; want both nil", err, newErr)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) || newErr == nil || newErr.Error() != err.Error() {
				t.Fatalf("Validate() = %v, New: %v; want both to say %q", err, newErr, tc.want)
			}
		})
	}
}
