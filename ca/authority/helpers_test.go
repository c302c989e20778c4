package authority

import (
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/softhsmtest"
)

var testTD = spiffeid.RequireTrustDomainFromString("mesh.test")

// token is the SoftHSM2 token the tests of this package share.
var token = softhsmtest.Dir{Pattern: "agentmesh-authority-", Label: "authority-test"}

func TestMain(m *testing.M) {
	code := m.Run()
	token.Remove()
	os.Exit(code)
}

// openTest opens an Authority on the shared token in a new state directory.
func openTest(t *testing.T) (*Authority, string) {
	t.Helper()
	_, uri := token.Token(t)
	dir := t.TempDir()
	a, err := Open(t.Context(), Config{
		TrustDomain:   testTD,
		StateDir:      dir,
		KMS:           uri,
		SVIDLifetime:  time.Hour,
		Backdate:      time.Minute,
		TokenLifetime: time.Minute,
		Logger:        slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := a.Close(nil); err != nil {
			t.Error(err)
		}
	})
	return a, dir
}
