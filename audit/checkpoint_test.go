package audit_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"testing"

	"golang.org/x/mod/sumdb/tlog"

	"github.com/agentmesh/agentmesh/audit"
)

func newNoteSigner(t *testing.T, name string) *audit.NoteSigner {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, err := audit.NewNoteSigner(name, k)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// treeOf returns the checkpoint of the first n of records.
func treeOf(t *testing.T, origin string, records [][]byte, n int) (audit.Checkpoint, tlog.HashReaderFunc) {
	t.Helper()
	var stored []tlog.Hash
	for i, r := range records {
		hs, err := tlog.StoredHashes(int64(i), r, tlog.HashReaderFunc(func(idx []int64) ([]tlog.Hash, error) {
			out := make([]tlog.Hash, len(idx))
			for j, x := range idx {
				out[j] = stored[x]
			}
			return out, nil
		}))
		if err != nil {
			t.Fatal(err)
		}
		stored = append(stored, hs...)
	}
	hr := tlog.HashReaderFunc(func(idx []int64) ([]tlog.Hash, error) {
		out := make([]tlog.Hash, len(idx))
		for j, x := range idx {
			out[j] = stored[x]
		}
		return out, nil
	})
	h, err := tlog.TreeHash(int64(n), hr)
	if err != nil {
		t.Fatal(err)
	}
	return audit.Checkpoint{Origin: origin, Size: uint64(n), Hash: h}, hr
}

func TestCosignChecksConsistency(t *testing.T) {
	writer, witness := newNoteSigner(t, "example.org/host/a/audit"), newNoteSigner(t, "example.org/ca/witness")
	wv, err := audit.ParseVerifierKey(writer.VerifierKey())
	if err != nil {
		t.Fatal(err)
	}
	records := [][]byte{[]byte("a"), []byte("b"), []byte("c"), []byte("d"), []byte("e")}
	origin := "example.org/host/a/audit"
	old, _ := treeOf(t, origin, records, 2)
	next, hr := treeOf(t, origin, records, 5)
	proof, err := tlog.ProveTree(5, 2, hr)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := audit.SignCheckpoint(next, writer)
	if err != nil {
		t.Fatal(err)
	}
	cosigned, got, err := audit.Cosign(msg, wv, &old, proof, witness)
	if err != nil || got != next {
		t.Fatalf("Cosign = %v, %v; want %v", got, err, next)
	}
	witnessV, _ := audit.ParseVerifierKey(witness.VerifierKey())
	if _, _, err := audit.OpenCheckpoint(cosigned, wv, witnessV); err != nil {
		t.Fatalf("cosigned checkpoint does not verify with both keys: %v", err)
	}

	// A rewritten log: record 1 changed, same size; the proof from the honest old tree fails.
	forged := append([][]byte{}, records...)
	forged[1] = []byte("B")
	fnext, fhr := treeOf(t, origin, forged, 5)
	fproof, _ := tlog.ProveTree(5, 2, fhr)
	fmsg, _ := audit.SignCheckpoint(fnext, writer)
	if _, _, err := audit.Cosign(fmsg, wv, &old, fproof, witness); !errors.Is(err, audit.ErrInconsistent) {
		t.Fatalf("Cosign of a rewritten log = %v, want ErrInconsistent", err)
	}
	// A checkpoint signed by another key is refused.
	other := newNoteSigner(t, "example.org/host/a/audit")
	omsg, _ := audit.SignCheckpoint(next, other)
	if _, _, err := audit.Cosign(omsg, wv, &old, proof, witness); !errors.Is(err, audit.ErrCheckpoint) {
		t.Fatalf("Cosign of a foreign signature = %v, want ErrCheckpoint", err)
	}
}
