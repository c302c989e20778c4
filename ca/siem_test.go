package ca

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/agentmesh/agentmesh/policy"
)

func TestLoadSIEMSettings(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, yaml string
		line       int
		field      string
	}{
		{name: "no port", yaml: "address: siem\nca_file: ca.pem\n", line: 1, field: "address"},
		{name: "empty rule", yaml: "address: siem:6514\nca_file: ca.pem\ninclude:\n  - {}\n", line: 4, field: "include[0]"},
		{name: "unknown field", yaml: "address: siem:6514\nca_file: ca.pem\nport: 6514\n", line: 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), "siem.yaml")
			if err := os.WriteFile(path, []byte(tc.yaml), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := LoadSIEMSettings(path)
			var fe *policy.FieldError
			if !errors.As(err, &fe) || fe.Line != tc.line || (tc.field != "" && fe.Field != tc.field) {
				t.Fatalf("err = %v, want line %d field %q", err, tc.line, tc.field)
			}
		})
	}
	path := filepath.Join(t.TempDir(), "siem.yaml")
	if err := os.WriteFile(path, []byte("address: siem:6514\nca_file: ca.pem\nresend_window: 5s\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := LoadSIEMSettings(path)
	if err != nil {
		t.Fatal(err)
	}
	if s.CAFile != filepath.Join(filepath.Dir(path), "ca.pem") || s.ResendWindow.String() != "5s" {
		t.Errorf("settings %+v: ca_file resolved against the file's directory, resend_window 5s", s)
	}
}
