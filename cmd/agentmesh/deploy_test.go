package main

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/agentmesh/agentmesh/node"
)

// TestDeployManifests parses every Kubernetes manifest in deploy/ as YAML, checks each
// document names its kind, and loads every proxy configuration embedded in a ConfigMap
// with the proxy's own parser.
func TestDeployManifests(t *testing.T) {
	t.Parallel()
	paths, err := filepath.Glob("../../deploy/kubernetes/*.yaml")
	if err != nil || len(paths) == 0 {
		t.Fatalf("no manifests found: %v", err)
	}
	configs := 0
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(data))
		for i := 0; ; i++ {
			var doc struct {
				APIVersion string            `yaml:"apiVersion"`
				Kind       string            `yaml:"kind"`
				Data       map[string]string `yaml:"data"`
			}
			err := dec.Decode(&doc)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s document %d: %v", p, i, err)
			}
			if doc.APIVersion == "" || doc.Kind == "" {
				t.Errorf("%s document %d has no apiVersion or kind", p, i)
			}
			if doc.Kind != "ConfigMap" {
				continue
			}
			for name, content := range doc.Data {
				if name != "proxy.yaml" {
					continue
				}
				path := filepath.Join(t.TempDir(), name)
				if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
					t.Fatal(err)
				}
				if _, err := node.LoadConfig(path); err != nil {
					t.Errorf("%s: ConfigMap %s: %v", p, name, err)
				}
				configs++
			}
		}
	}
	if configs == 0 {
		t.Error("no proxy configuration found in the manifests")
	}
}
