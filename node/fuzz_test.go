package node

import (
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agentmesh/agentmesh/internal/testca"
)

// FuzzProxyConfig feeds arbitrary bytes to the configuration parser: it must return a
// config or an error, never panic.
func FuzzConfig(f *testing.F) {
	f.Add([]byte(goodConfig))
	f.Add([]byte("id: [unclosed\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if c, err := parseConfig("/fuzz.yaml", data); err == nil && c.ID == "" {
			t.Fatal("config without id accepted")
		}
	})
}

// FuzzCAAuditState feeds arbitrary bytes as STATE/ca-audit.json: loading it gives a
// state or an error naming the file, never a panic.
func FuzzCAAuditState(f *testing.F) {
	f.Add([]byte(`{"witness_key":"","cosigned":""}`))
	f.Add([]byte(`{"witness_key":"k+00000000+AgA=","cosigned":"o\n1\nAAAA\n\n— k x\n","refused":"inconsistent"}`))
	f.Add([]byte(`[`))
	key := testca.NewKey(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(t.TempDir(), caAuditFile)
		writeTestFile(t, path, string(data))
		l, err := newCALog(path, caOrigin, key, &auditRecords{}, nil, slog.New(slog.DiscardHandler))
		if err != nil {
			if !strings.Contains(err.Error(), path) {
				t.Fatalf("error without the file: %v", err)
			}
			return
		}
		l.Cosigned()
	})
}
