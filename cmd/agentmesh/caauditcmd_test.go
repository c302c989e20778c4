package main

import (
	"bytes"
	"regexp"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/meshapi"
)

// The CA's status lists each witnessed log with its state, the size of its latest
// cosigned checkpoint, when it was last seen and by how many witnesses.
func TestPrintWitness(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	note := func(origin, size string) string {
		return origin + "\n" + size + "\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\n— " + origin + " AAAA\n"
	}
	logs := []meshapi.WitnessedLog{
		{Origin: "mesh.test/ca/audit", Latest: note("mesh.test/ca/audit", "40"), WitnessKeys: []string{"a", "b"},
			LastSeen: now.Add(-3 * time.Second), State: "ok"},
		{Origin: "mesh.test/host/h1/audit", Latest: note("mesh.test/host/h1/audit", "1200"), WitnessKeys: []string{"ca"},
			LastSeen: now.Add(-2 * time.Minute), State: "inconsistent"},
	}
	var out bytes.Buffer
	if err := printWitness(&out, logs, false, now); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`mesh\.test/ca/audit +ok +40 +3s ago +2\n`,
		`mesh\.test/host/h1/audit +inconsistent +1200 +2m0s ago +1\n`,
	} {
		if !regexp.MustCompile(want).MatchString(out.String()) {
			t.Errorf("status lacks %q:\n%s", want, out.String())
		}
	}
	out.Reset()
	if err := printWitness(&out, nil, false, now); err != nil || !bytes.Contains(out.Bytes(), []byte("no audit log witnessed")) {
		t.Errorf("empty status: %q, %v", out.String(), err)
	}
}
