package main

import "testing"

// FuzzProxyConfig feeds arbitrary bytes to the configuration parser: it must return a
// config or an error, never panic.
func FuzzProxyConfig(f *testing.F) {
	f.Add([]byte(goodConfig))
	f.Add([]byte("id: [unclosed\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		var pf proxyFile
		doc, err := decodeYAML("fuzz.yaml", data, &pf)
		if err != nil {
			return
		}
		if _, err := pf.validate(doc, "/"); err == nil && pf.ID == "" {
			t.Fatal("config without id accepted")
		}
	})
}
