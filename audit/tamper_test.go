package audit_test

import (
	"bytes"
	"crypto/ecdsa"
	"errors"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/agentmesh/agentmesh/audit"
)

// TestTamper is the tamper suite: a real witnessed log, changed in each way a host's root
// user could, checked as `agentmesh audit verify --witness` does. Every change fails naming
// the first bad index; the untouched log passes.
func TestTamper(t *testing.T) {
	t.Parallel()
	const (
		n      = 100
		step   = 10 // a cosigned checkpoint every 10 records
		victim = 42 // the index tampered with
	)
	w := newTestWitness(t)
	path, key := witnessedLog(t, w, n, step)
	url, client := w.serve(t)
	orig := readFile(t, path)
	origCP := readFile(t, path+".checkpoint")

	cases := []struct {
		name string
		edit func(ls [][]byte) [][]byte
		// resign: sign a fresh checkpoint of the edited log with the writer's key, as
		// a root user holding the token would.
		resign bool
		// wantIndex is the index the error must name; for a consistent rewrite the
		// witness only knows a range, [wantIndex, next checkpoint), holding victim.
		wantIndex uint64
	}{
		{"untouched", func(ls [][]byte) [][]byte { return ls }, false, 0},
		{"edit a field", func(ls [][]byte) [][]byte {
			ls[victim] = bytes.Replace(ls[victim], []byte(`"result":"ok"`), []byte(`"result":"denied"`), 1)
			return ls
		}, false, victim},
		{"delete a record", func(ls [][]byte) [][]byte { return append(ls[:victim], ls[victim+1:]...) }, false, victim},
		{"swap two records", func(ls [][]byte) [][]byte {
			ls[victim], ls[victim+1] = ls[victim+1], ls[victim]
			return ls
		}, false, victim},
		{"insert a record", func(ls [][]byte) [][]byte {
			// A valid record from elsewhere in the log, replayed.
			return append(ls[:victim], append([][]byte{bytes.Clone(ls[10])}, ls[victim:]...)...)
		}, false, victim},
		{"cut the tail after a witnessed checkpoint", func(ls [][]byte) [][]byte { return ls[:n-15] }, false, n - 15},
		{"cut the tail and re-sign", func(ls [][]byte) [][]byte { return ls[:n-15] }, true, n - 15},
		{"rewrite with recomputed hashes and a fresh checkpoint", func(ls [][]byte) [][]byte {
			ls[victim] = bytes.Replace(ls[victim], []byte(`"result":"ok"`), []byte(`"result":"denied"`), 1)
			return rechain(t, ls, victim)
		}, true, victim / step * step},
		{"rewrite with recomputed hashes and a checkpoint signed by another key", func(ls [][]byte) [][]byte {
			ls[victim] = bytes.Replace(ls[victim], []byte(`"result":"ok"`), []byte(`"result":"denied"`), 1)
			return rechain(t, ls, victim)
		}, true, victim / step * step},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			tampered := dir + "/audit.log"
			ls := tc.edit(lines(bytes.Clone(orig)))
			if err := os.WriteFile(tampered, join(ls), 0o600); err != nil {
				t.Fatal(err)
			}
			cp := origCP
			if tc.resign {
				signer := key
				if strings.Contains(tc.name, "another key") {
					signer = newKey(t)
				}
				cp = resign(t, signer, tampered)
			}
			// The writer's key is not given: it comes from the witness's binding.
			rep, err := audit.VerifyLog(tampered, audit.VerifyOptions{Checkpoint: cp, Witness: fetchView(t, url, client)})
			if tc.name == "untouched" {
				if err != nil || rep.Records != n || rep.Witnessed == nil || rep.Witnessed.Size != n || !rep.CheckpointSigned {
					t.Fatalf("VerifyLog = %+v, %v; want %d records, witnessed, signature checked", rep, err, n)
				}
				return
			}
			ve, ok := errors.AsType[*audit.VerifyError](err)
			if !ok {
				t.Fatalf("VerifyLog = %v, want a *VerifyError", err)
			}
			if ve.Seq-1 != tc.wantIndex {
				t.Errorf("VerifyError names index %d, want %d: %v", ve.Seq-1, tc.wantIndex, err)
			}
		})
	}
}

// TestTamperNoWitness: without the witness, the writer's own checkpoint still catches a
// cut tail, but not a consistent rewrite with a fresh checkpoint; that is what the
// witness is for.
func TestTamperNoWitness(t *testing.T) {
	t.Parallel()
	w := newTestWitness(t)
	path, key := witnessedLog(t, w, 30, 10)
	cp := readFile(t, path+".checkpoint")
	ls := lines(readFile(t, path))
	if err := os.WriteFile(path, join(ls[:25]), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := audit.VerifyLog(path, audit.VerifyOptions{Checkpoint: cp, Key: verifierKey(t, key)})
	if ve, ok := errors.AsType[*audit.VerifyError](err); !ok || ve.Seq != 26 {
		t.Fatalf("VerifyLog of a cut log = %v, want index 25 missing", err)
	}
	// A checkpoint signed by another key is refused outright.
	_, err = audit.VerifyLog(path, audit.VerifyOptions{Checkpoint: cp, Key: verifierKey(t, newKey(t))})
	if !errors.Is(err, audit.ErrCheckpoint) {
		t.Fatalf("VerifyLog with the wrong key = %v, want ErrCheckpoint", err)
	}
	// The witness bound the writer's key: another given key is refused.
	w2 := newTestWitness(t)
	p2, _ := witnessedLog(t, w2, 5, 5)
	url, client := w2.serve(t)
	_, err = audit.VerifyLog(p2, audit.VerifyOptions{Key: verifierKey(t, key), Witness: fetchView(t, url, client)})
	if !errors.Is(err, audit.ErrCheckpoint) {
		t.Fatalf("VerifyLog with a key the witness did not bind = %v, want ErrCheckpoint", err)
	}
	fresh := resign(t, key, path)
	if _, err := audit.VerifyLog(path, audit.VerifyOptions{Checkpoint: fresh, Key: verifierKey(t, key)}); err != nil {
		t.Fatalf("VerifyLog of a re-signed cut log without the witness = %v; it cannot know", err)
	}
}

var prevField = regexp.MustCompile(`"prev":"[0-9a-f]{64}"`)

// rechain recomputes prev and hash of every record from index from on, as someone
// rewriting the log consistently would.
func rechain(t testing.TB, ls [][]byte, from int) [][]byte {
	t.Helper()
	for i := from; i < len(ls); i++ {
		if i > 0 {
			prev := ls[i-1][len(ls[i-1])-suffixLen+len(`,"hash":"`) : len(ls[i-1])-2]
			ls[i] = prevField.ReplaceAll(ls[i], []byte(`"prev":"`+string(prev)+`"`))
		}
		ls[i] = rehash(ls[i])
	}
	return ls
}

// resign signs a checkpoint of the log at path, as it is now, with key.
func resign(t testing.TB, key *ecdsa.PrivateKey, path string) []byte {
	t.Helper()
	rep, err := audit.VerifyLog(path, audit.VerifyOptions{})
	if err != nil {
		t.Fatalf("the rewritten log must pass its own chain: %v", err)
	}
	s, err := audit.NewNoteSigner(testOrigin, key)
	if err != nil {
		t.Fatal(err)
	}
	b, err := audit.SignCheckpoint(audit.Checkpoint{Origin: testOrigin, Size: rep.Records, Hash: rep.Root}, s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
