package audit_test

import (
	"errors"
	"os"
	"testing"

	"github.com/agentmesh/agentmesh/audit"
)

// TestProveFile: an inclusion proof in the cosigned checkpoint checks offline with the
// writer's and the witness's keys, whatever became of the hash file, and a log that no
// longer matches the checkpoint gives none.
func TestProveFile(t *testing.T) {
	t.Parallel()
	w := newTestWitness(t)
	path, key := witnessedLog(t, w, 50, 10)
	cosigned := readFile(t, path+".cosigned")
	writer, witness := mustVerifier(t, verifierKey(t, key)), mustVerifier(t, w.signer.VerifierKey())
	ls := lines(readFile(t, path))
	for _, damage := range []string{"intact", "zeroed", "removed"} {
		switch damage {
		case "zeroed":
			if err := os.WriteFile(path+".hashes", make([]byte, 4096), 0o600); err != nil {
				t.Fatal(err)
			}
		case "removed":
			if err := os.Remove(path + ".hashes"); err != nil {
				t.Fatal(err)
			}
		default: // the file as the writer left it
		}
		p, err := audit.ProveFile(path, 17, cosigned)
		if err != nil {
			t.Fatalf("%s hash file: ProveFile: %v", damage, err)
		}
		if p.Record != string(ls[17]) || p.TreeSize != 50 {
			t.Fatalf("%s hash file: proof of %q in %d", damage, p.Record, p.TreeSize)
		}
		if _, err := audit.CheckInclusion(p, writer, witness); err != nil {
			t.Errorf("%s hash file: CheckInclusion: %v", damage, err)
		}
		forged := p
		forged.Record = string(ls[18])
		if _, err := audit.CheckInclusion(forged, writer, witness); !errors.Is(err, audit.ErrNotIncluded) {
			t.Errorf("%s hash file: CheckInclusion of another record = %v, want ErrNotIncluded", damage, err)
		}
	}
	if _, err := audit.ProveFile(path, 50, cosigned); err == nil {
		t.Error("ProveFile past the checkpoint's size must fail")
	}
	// Record 3 removed: ProveFile does not check the chain, but the tree differs.
	other := append(ls[:3:3], ls[4:]...)
	if err := os.WriteFile(path, join(other), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := audit.ProveFile(path, 2, cosigned); !errors.Is(err, audit.ErrInconsistent) {
		t.Errorf("ProveFile on a log cut in the middle = %v, want ErrInconsistent", err)
	}
}
