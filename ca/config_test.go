package ca

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	valid := Config{StateDir: "/var/lib/agentmesh-ca", TrustDomain: testTD}
	for _, tc := range []struct {
		name   string
		mutate func(*Config)
		ok     bool
	}{
		{"defaults", func(*Config) {}, true},
		{"no state dir", func(c *Config) { c.StateDir = "" }, false},
		{"no trust domain", func(c *Config) { c.TrustDomain = spiffeid.TrustDomain{} }, false},
		{"lifetime at the 10s minimum", func(c *Config) { c.SVIDLifetime = 10 * time.Second }, true},
		{"lifetime below the minimum", func(c *Config) { c.SVIDLifetime = 9 * time.Second }, false},
		{"negative lifetime", func(c *Config) { c.SVIDLifetime = -time.Minute }, false},
		{"negative token lifetime", func(c *Config) { c.TokenLifetime = -time.Minute }, false},
		{"token lifetime above 24h", func(c *Config) { c.TokenLifetime = 25 * time.Hour }, false},
		{"listen without port", func(c *Config) { c.Listen = "localhost" }, false},
		{"listen port 0", func(c *Config) { c.Listen = "127.0.0.1:0" }, true},
		{"short directory ttl", func(c *Config) { c.DirectoryTTL = time.Second }, true},
		{"negative directory ttl", func(c *Config) { c.DirectoryTTL = -time.Second }, false},
		{"negative live window", func(c *Config) { c.RotationLiveWindow = -time.Second }, false},
		{"renew window below the lifetime", func(c *Config) { c.RotationRenewWindow = 59 * time.Minute }, true},
		{"renew window at the lifetime", func(c *Config) { c.RotationRenewWindow = time.Hour }, false},
		{"negative renew window", func(c *Config) { c.RotationRenewWindow = -time.Second }, false},
		{"status on loopback", func(c *Config) { c.StatusListen = "127.0.0.1:9444" }, true},
		{"status on every interface", func(c *Config) { c.StatusListen = ":9444" }, false},
		{"status on a public address", func(c *Config) { c.StatusListen = "192.0.2.1:9444" }, false},
		{"admin of the trust domain", func(c *Config) { c.AdminIDs = []spiffeid.ID{spiffeid.RequireFromPath(testTD, "/admin/a")} }, true},
		{"admin of another trust domain", func(c *Config) {
			c.AdminIDs = []spiffeid.ID{spiffeid.RequireFromString("spiffe://other.test/admin/a")}
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := valid
			tc.mutate(&cfg)
			err := cfg.withDefaults().validate()
			if tc.ok && err != nil {
				t.Fatalf("validate: %v", err)
			}
			if !tc.ok && !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("validate: %v, want ErrInvalidConfig", err)
			}
		})
	}
}

func TestConfigDefaults(t *testing.T) {
	t.Parallel()
	c := Config{StateDir: "relative/state"}.withDefaults()
	switch {
	case c.Listen != ":9443", c.SVIDLifetime != time.Hour, c.TokenLifetime != 5*time.Minute, c.Logger == nil,
		c.DirectoryTTL != 30*time.Second, c.RotationLiveWindow != 30*time.Second, c.RotationRenewWindow != 15*time.Minute:
		t.Errorf("defaults: %+v", c)
	case !strings.HasPrefix(c.StateDir, "/"):
		t.Errorf("StateDir %q not made absolute", c.StateDir)
	}
}

func TestBackdate(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		lifetime, want time.Duration
	}{
		{10 * time.Second, time.Second},
		{time.Minute, 6 * time.Second},
		{10 * time.Minute, time.Minute},
		{time.Hour, time.Minute},
		{24 * time.Hour, time.Minute},
	} {
		if got := backdate(tc.lifetime); got != tc.want {
			t.Errorf("backdate(%v) = %v, want %v", tc.lifetime, got, tc.want)
		}
	}
}

func TestPeerAllowed(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		peer, self int
		want       bool
	}{
		{0, 1000, true},
		{1000, 1000, true},
		{1001, 1000, false},
		{-1, 1000, false},
		{0, 0, true},
	} {
		if got := peerAllowed(tc.peer, tc.self); got != tc.want {
			t.Errorf("peerAllowed(%d, %d) = %v", tc.peer, tc.self, got)
		}
	}
}

func TestCheckIssuable(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		id   spiffeid.ID
		ok   bool
	}{
		{"workload", spiffeid.RequireFromPath(testTD, "/agent/a"), true},
		{"host", spiffeid.RequireFromPath(testTD, "/host/h1"), true},
		{"trust domain ID", testTD.ID(), false},
		{"other trust domain", spiffeid.RequireFromPath(spiffeid.RequireTrustDomainFromString("mesh.test.evil"), "/a"), false},
		{"zero", spiffeid.ID{}, false},
	} {
		err := checkIssuable(testTD, tc.id)
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrInvalidID)) {
			t.Errorf("%s: checkIssuable(%q) = %v", tc.name, tc.id, err)
		}
	}
}
