package node

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/proxy"
)

const goodConfig = `id: spiffe://example.org/host/a
state: state
ca:
  url: https://127.0.0.1:9443
  root: root.crt
  token_file: token
rotation:
  overlap: 10s
routes:
  - listen: 127.0.0.1:18080
    peer: 127.0.0.1:15008
    peer_id: spiffe://example.org/host/b
    target_port: 8080
services:
  - port: 9090
    allow: [spiffe://example.org/host/b]
`

func writeConfig(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "proxy.yaml")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestLoadConfig(t *testing.T) {
	t.Parallel()
	path := writeConfig(t, goodConfig)
	c, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Dir(path)
	switch {
	case c.id.String() != "spiffe://example.org/host/a":
		t.Errorf("ID = %s", c.id)
	case c.State != filepath.Join(dir, "state") || c.CA.Root != filepath.Join(dir, "root.crt"):
		t.Errorf("relative paths not resolved against the file: state=%s root=%s", c.State, c.CA.Root)
	case c.Audit.Path != filepath.Join(dir, "state", "audit.log"):
		t.Errorf("AuditPath = %s", c.Audit.Path)
	case c.Tunnel != ":15008" || c.Admin != "127.0.0.1:15020":
		t.Errorf("defaults: tunnel=%s admin=%s", c.Tunnel, c.Admin)
	case c.unattested != proxy.UnattestedDeny || c.unknown != proxy.UnknownDeny:
		t.Errorf("defaults: unattested=%s unknown=%s, want deny and deny", c.unattested, c.unknown)
	case c.Rotation.Overlap != 10*time.Second:
		t.Errorf("overlap = %v", c.Rotation.Overlap)
	case len(c.routes) != 1 || c.routes[0].TargetPort != 8080 || c.routes[0].PeerID.String() != "spiffe://example.org/host/b":
		t.Errorf("routes = %+v", c.routes)
	case len(c.services) != 1 || c.services[0].Port != 9090 || len(c.services[0].Allow) != 1:
		t.Errorf("services = %+v", c.services)
	}
}

// TestLoadProxyConfigPool: the pool section reaches the configuration as written, and
// its absence leaves zeros (the proxy's defaults).
func TestLoadConfigPool(t *testing.T) {
	t.Parallel()
	c, err := LoadConfig(writeConfig(t, strings.Replace(goodConfig, "state: state",
		"state: state\npool:\n  max_lifetime: 10m\n  max_streams: 4\n  idle_timeout: 3s", 1)))
	if err != nil {
		t.Fatal(err)
	}
	if want := (PoolSettings{MaxLifetime: 10 * time.Minute, MaxStreams: 4, IdleTimeout: 3 * time.Second}); c.Pool != want {
		t.Errorf("pool = %+v, want %+v", c.Pool, want)
	}
	c, err = LoadConfig(writeConfig(t, goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	if c.Pool != (PoolSettings{}) {
		t.Errorf("pool = %+v without a pool section, want zeros", c.Pool)
	}
}

// TestLoadProxyConfigErrors checks that every malformed file is refused with the file,
// the line and the field that is wrong.
func TestLoadConfigErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		edit  func(string) string
		line  int
		field string
	}{
		{name: "bad SPIFFE ID", edit: replace("id: spiffe://example.org/host/a", "id: http://example.org/a"), line: 1, field: "id"},
		{name: "missing id", edit: replace("id: spiffe://example.org/host/a\n", ""), line: 0, field: "id"},
		{name: "plain http CA", edit: replace("https://127.0.0.1:9443", "http://127.0.0.1:9443"), line: 4, field: "ca.url"},
		{name: "negative overlap", edit: replace("overlap: 10s", "overlap: -1s"), line: 8, field: "rotation.overlap"},
		{name: "renew fraction out of range", edit: replace("overlap: 10s", "renew_fraction: 2"), line: 8, field: "rotation.renew_fraction"},
		{name: "route without port", edit: replace("listen: 127.0.0.1:18080", "listen: 127.0.0.1"), line: 10, field: "routes[0].listen"},
		{name: "route target port out of range", edit: replace("target_port: 8080", "target_port: 70000"), line: 13, field: "routes[0].target_port"},
		{name: "route peer id not SPIFFE", edit: replace("peer_id: spiffe://example.org/host/b", "peer_id: b"), line: 12, field: "routes[0].peer_id"},
		{name: "service allows a bad id", edit: replace("allow: [spiffe://example.org/host/b]", "allow: [spiffe://example.org/host/b, nope]"), line: 16, field: "services[0].allow[1]"},
		{name: "service allows nobody", edit: replace("allow: [spiffe://example.org/host/b]", "allow: []"), line: 16, field: "services[0].allow"},
		{name: "unknown field", edit: replace("state: state", "stat: state"), line: 2},
		{name: "unknown transport", edit: replace("state: state", "state: state\ntransports: [h2, spdy]"), line: 3, field: "transports[1]"},
		{name: "route with an unknown transport", edit: replace("target_port: 8080", "target_port: 8080\n    transport: h3"), line: 14, field: "routes[0].transport"},
		{name: "unknown key store", edit: replace("state: state", "state: state\nkeys: tpm"), line: 3, field: "keys"},
		{name: "unknown unattested policy", edit: replace("state: state", "state: state\nunattested: allow"), line: 3, field: "unattested"},
		{name: "too many intermediates", edit: replace("state: state", "state: state\ntls:\n  max_intermediates: 5"), line: 4, field: "tls.max_intermediates"},
		{name: "negative pool lifetime", edit: replace("state: state", "state: state\npool:\n  max_lifetime: -1s"), line: 4, field: "pool.max_lifetime"},
		{name: "pool streams out of range", edit: replace("state: state", "state: state\npool:\n  max_streams: 70000"), line: 4, field: "pool.max_streams"},
		{name: "negative pool idle timeout", edit: replace("state: state", "state: state\npool:\n  idle_timeout: -5s"), line: 4, field: "pool.idle_timeout"},
		{name: "negative connection limit", edit: replace("state: state", "state: state\nlimits:\n  max_connections: -1"), line: 4, field: "limits.max_connections"},
		{name: "negative handshake limit", edit: replace("state: state", "state: state\nlimits:\n  max_handshakes_in_flight: -5"), line: 4, field: "limits.max_handshakes_in_flight"},
		{name: "unknown audit ack", edit: replace("state: state", "state: state\naudit:\n  ack: eventually"), line: 4, field: "audit.ack"},
		{name: "siem without port", edit: replace("state: state", "state: state\naudit:\n  siem:\n    address: syslog\n    ca_file: ca.pem"), line: 5, field: "audit.siem.address"},
		{name: "siem empty rule", edit: replace("state: state", "state: state\naudit:\n  siem:\n    address: syslog:6514\n    ca_file: ca.pem\n    exclude:\n      - {}"), line: 8, field: "audit.siem.exclude[0]"},
		{name: "wrong type", edit: replace("target_port: 8080", "target_port: eighty"), line: 13},
		{name: "bad duration", edit: replace("overlap: 10s", "overlap: ten"), line: 8},
		{name: "not YAML", edit: func(string) string { return "id: [unclosed\n" }, line: 1},
		{name: "empty file", edit: func(string) string { return "" }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := writeConfig(t, tc.edit(goodConfig))
			_, err := LoadConfig(path)
			var fe *FileError
			if !errors.As(err, &fe) {
				t.Fatalf("err = %v, want *FileError", err)
			}
			if fe.File != path || fe.Line != tc.line || fe.Field != tc.field {
				t.Fatalf("error at %s:%d field %q, want line %d field %q (%v)", fe.File, fe.Line, fe.Field, tc.line, tc.field, err)
			}
			if !strings.HasPrefix(err.Error(), path) {
				t.Fatalf("message %q does not start with the file name", err)
			}
		})
	}
}

// TestLoadConfigProxyRules: what only the proxy's own validation knows is refused when
// the file is loaded, not when the proxy starts, so a reload keeps it out too.
func TestLoadConfigProxyRules(t *testing.T) {
	t.Parallel()
	for _, edit := range []func(string) string{
		replace("target_port: 8080", "target_port: 8080\n    transport: h2"), // h2 is not among transports [tls]
		replace("services:\n", "services:\n  - port: 9090\n    allow: [spiffe://example.org/host/c]\n"),
	} {
		path := writeConfig(t, edit(goodConfig))
		_, err := LoadConfig(path)
		var fe *FileError
		if !errors.As(err, &fe) || !errors.Is(err, proxy.ErrInvalidConfig) || fe.File != path {
			t.Fatalf("err = %v, want a *FileError of %s wrapping proxy.ErrInvalidConfig", err, path)
		}
	}
}

func replace(old, repl string) func(string) string {
	return func(s string) string {
		if !strings.Contains(s, old) {
			panic("test config lacks " + old)
		}
		return strings.Replace(s, old, repl, 1)
	}
}

// TestDeployExamplesParse loads every example configuration and policy shipped in
// deploy/.
func TestDeployExamplesParse(t *testing.T) {
	t.Parallel()
	paths, err := filepath.Glob("../deploy/examples/*.yaml")
	if err != nil || len(paths) == 0 {
		t.Fatalf("no example configs found: %v", err)
	}
	for _, p := range paths {
		load := func(p string) error { _, err := LoadConfig(p); return err }
		if strings.HasPrefix(filepath.Base(p), "policy") {
			load = func(p string) error { _, err := LoadPolicy(p); return err }
		}
		if err := load(p); err != nil {
			t.Errorf("%s: %v", p, err)
		}
	}
}
