// Package testtlog is a Merkle log in memory (RFC 6962, golang.org/x/mod/sumdb/tlog) for
// tests that play a log's writer: it grows, signs checkpoints and proves consistency.
// It is a test helper, never imported by non-test code.
package testtlog

import (
	"fmt"
	"testing"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"

	"github.com/agentmesh/agentmesh/audit"
)

// Tree is a log of records in memory; the zero value is empty.
type Tree struct {
	stored []tlog.Hash
	n      int64
}

// ReadHashes implements tlog.HashReader.
func (t *Tree) ReadHashes(idx []int64) ([]tlog.Hash, error) {
	out := make([]tlog.Hash, len(idx))
	for i, x := range idx {
		if x < 0 || x >= int64(len(t.stored)) {
			return nil, fmt.Errorf("testtlog: hash %d not stored", x)
		}
		out[i] = t.stored[x]
	}
	return out, nil
}

// Size is the number of records.
func (t *Tree) Size() uint64 { return uint64(t.n) }

// Add appends n records whose text is prefix and their index.
func (t *Tree) Add(tb testing.TB, n int, prefix string) {
	tb.Helper()
	for range n {
		h, err := tlog.StoredHashes(t.n, fmt.Appendf(nil, "%s %d", prefix, t.n), t)
		if err != nil {
			tb.Fatal(err)
		}
		t.stored, t.n = append(t.stored, h...), t.n+1
	}
}

// Signed returns the tree's checkpoint under origin signed by s, with the consistency
// proof from old records (none when old is 0 or not below the size).
func (t *Tree) Signed(tb testing.TB, origin string, s note.Signer, old uint64) ([]byte, tlog.TreeProof) {
	tb.Helper()
	root, err := tlog.TreeHash(t.n, t)
	if err != nil {
		tb.Fatal(err)
	}
	msg, err := audit.SignCheckpoint(audit.Checkpoint{Origin: origin, Size: uint64(t.n), Hash: root}, s)
	if err != nil {
		tb.Fatal(err)
	}
	var proof tlog.TreeProof
	if old > 0 && int64(old) < t.n {
		if proof, err = tlog.ProveTree(t.n, int64(old), t); err != nil {
			tb.Fatal(err)
		}
	}
	return msg, proof
}
