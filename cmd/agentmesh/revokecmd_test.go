package main

import (
	"context"
	"crypto/tls"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agentmesh/agentmesh/meshclient"
)

// adminCall takes the path the flags name, exactly one of them, and refuses an admin
// key that others can read before anything is sent.
func TestAdminCall(t *testing.T) {
	t.Parallel()
	local := func(_ context.Context, state string, req string) (string, error) {
		return "local " + state + " " + req, nil
	}
	remote := func(_ context.Context, cfg meshclient.ClientConfig, _ tls.Certificate, req string) (string, error) {
		return "remote " + cfg.URL + " " + req, nil
	}
	dir := t.TempDir()
	key := filepath.Join(dir, "admin.key")
	if err := os.WriteFile(key, []byte("not read"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		flags   adminFlags
		want    string // "" when refused
		wantErr string
	}{
		{"socket", adminFlags{state: "/var/lib/ca"}, "local /var/lib/ca req", ""},
		{"neither", adminFlags{}, "", errAdminFlags.Error()},
		{"both", adminFlags{state: "/var/lib/ca", caURL: "https://ca"}, "", errAdminFlags.Error()},
		{"remote without a certificate", adminFlags{caURL: "https://ca", root: "root.crt"}, "", "--ca needs --root, --cert and --key"},
		{"remote with a key others read", adminFlags{caURL: "https://ca", root: "r", cert: "c", key: key}, "", "readable by others"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := adminCall(t.Context(), &tc.flags, "req", local, remote)
			if tc.want != "" {
				if err != nil || got != tc.want {
					t.Fatalf("adminCall = %q, %v; want %q", got, err, tc.want)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("adminCall = %q, %v; want an error with %q", got, err, tc.wantErr)
			}
			if tc.wantErr == errAdminFlags.Error() && !errors.Is(err, errAdminFlags) {
				t.Fatalf("adminCall = %v, want errAdminFlags", err)
			}
		})
	}
}
