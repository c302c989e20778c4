package softhsmtest

import (
	"testing"
)

// recorder is a testing.TB that records whether the test would have been failed or
// skipped instead of stopping it.
type recorder struct {
	testing.TB
	failed, skipped bool
}

func (r *recorder) Helper()               {}
func (r *recorder) Fatalf(string, ...any) { r.failed = true }
func (r *recorder) Skipf(string, ...any)  { r.skipped = true }

// TestMissingFailsUnderCI checks that a missing SoftHSM tool skips a test on a
// developer's machine and fails it when CI=true.
func TestMissingFailsUnderCI(t *testing.T) {
	for _, ci := range []string{"", "true"} {
		t.Run("CI="+ci, func(t *testing.T) {
			t.Setenv("CI", ci)
			r := &recorder{TB: t}
			RequireTool(r, "agentmesh-no-such-pkcs11-tool")
			if want := ci == "true"; r.failed != want || r.skipped == want {
				t.Errorf("CI=%q: failed=%v skipped=%v, want failed=%v", ci, r.failed, r.skipped, want)
			}
		})
	}
}
