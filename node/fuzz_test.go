package node

import "testing"

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
