package audit

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

// InclusionProof shows that one record is in a log, to anyone holding the verifier keys
// of the writer and its witness, offline: check Checkpoint's signatures (note.Open), then
// tlog.CheckRecord(Proof, TreeSize, the checkpoint's root, Index,
// tlog.RecordHash(Record)).
type InclusionProof struct {
	// Record is the record's line, without its newline.
	Record string `json:"record"`
	// Index is the record's leaf index: its seq - 1.
	Index uint64 `json:"index"`
	// TreeSize is the size of Checkpoint's tree.
	TreeSize uint64 `json:"tree_size"`
	// Proof is the RFC 6962 inclusion proof, base64 hashes.
	Proof []string `json:"proof"`
	// Checkpoint is the signed note of the checkpoint, cosigned where it was witnessed.
	Checkpoint string `json:"checkpoint"`
}

// maxProofBytes bounds an inclusion proof document: a record line, a checkpoint and at
// most 64 hashes.
const maxProofBytes = maxRecordBytes*2 + maxCheckpointBytes + 64<<10

// ProveFile builds the inclusion proof of the record at index of the log at path in the
// signed checkpoint cp, which must have been signed over at least index+1 records. It
// reads the log's hash file and, should that not give a proof matching the checkpoint's
// root (the file is derived data), recomputes the tree from the records. The proof is
// checked before it is returned, against cp's root; cp's signatures are not checked.
func ProveFile(path string, index uint64, cp []byte) (InclusionProof, error) {
	var p InclusionProof
	c, err := UnverifiedCheckpoint(cp)
	if err != nil {
		return p, err
	}
	if index >= c.Size {
		return p, fmt.Errorf("%w: index %d, checkpoint of %d records", errNoProof, index, c.Size)
	}
	var line []byte
	err = Scan(path, index+1, func(_ uint64, l []byte) error {
		line = bytes.Clone(l)
		return ErrStop
	})
	if err != nil {
		return p, err
	}
	if line == nil {
		return p, fmt.Errorf("%w: the log has no record %d", errNoProof, index)
	}
	leaf := tlog.RecordHash(line)
	proof, err := proveFromHashFile(path, index, c.Size)
	if err != nil || tlog.CheckRecord(proof, int64(c.Size), c.Hash, int64(index), leaf) != nil {
		if proof, err = proveFromRecords(path, index, c.Size); err != nil {
			return p, err
		}
		if err := tlog.CheckRecord(proof, int64(c.Size), c.Hash, int64(index), leaf); err != nil {
			return p, fmt.Errorf("%w: the log does not match the checkpoint: %w", ErrInconsistent, err)
		}
	}
	p = InclusionProof{Record: string(line), Index: index, TreeSize: c.Size, Checkpoint: string(cp)}
	for _, h := range proof {
		p.Proof = append(p.Proof, base64.StdEncoding.EncodeToString(h[:]))
	}
	return p, nil
}

// UnverifiedCheckpoint parses a signed checkpoint's body without checking any signature:
// to learn a log's origin or size before checking it with the right keys.
func UnverifiedCheckpoint(cp []byte) (Checkpoint, error) {
	if cp == nil {
		return Checkpoint{}, fmt.Errorf("%w: none", ErrCheckpoint)
	}
	c, _, err := openLocalCheckpoint(cp, "")
	if err != nil {
		return Checkpoint{}, err
	}
	return *c, nil
}

func proveFromHashFile(path string, index, size uint64) (tlog.RecordProof, error) {
	f, err := os.Open(path + hashesSuffix)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }() // read only
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	t := &tree{path: f.Name(), f: f}
	t.hashed.Store(st.Size() / tlog.HashSize)
	return tlog.ProveRecord(int64(size), int64(index), t)
}

// proveFromRecords recomputes the stored hashes of the first size records in memory
// (64 bytes a record).
func proveFromRecords(path string, index, size uint64) (tlog.RecordProof, error) {
	var (
		e      edge
		stored []byte
	)
	err := Scan(path, 1, func(seq uint64, line []byte) error {
		if seq > size {
			return ErrStop
		}
		stored = e.add(tlog.RecordHash(line), stored)
		return nil
	})
	if err != nil {
		return nil, err
	}
	if e.n < size {
		return nil, fmt.Errorf("%w: the log has %d records, the checkpoint %d", ErrInconsistent, e.n, size)
	}
	return tlog.ProveRecord(int64(size), int64(index), tlog.HashReaderFunc(func(idx []int64) ([]tlog.Hash, error) {
		out := make([]tlog.Hash, len(idx))
		for i, x := range idx {
			if x < 0 || x >= int64(len(stored)/tlog.HashSize) {
				return nil, fmt.Errorf("audit: stored hash %d out of range", x)
			}
			copy(out[i][:], stored[x*tlog.HashSize:])
		}
		return out, nil
	}))
}

// ParseInclusionProof parses an InclusionProof document. It never panics.
func ParseInclusionProof(b []byte) (InclusionProof, error) {
	var p InclusionProof
	if len(b) > maxProofBytes {
		return p, fmt.Errorf("%w: proof larger than %d bytes", ErrCheckpoint, maxProofBytes)
	}
	if err := json.Unmarshal(b, &p); err != nil {
		return p, fmt.Errorf("%w: proof: %w", ErrCheckpoint, err)
	}
	return p, nil
}

// ErrNotIncluded is wrapped when an inclusion proof does not show its record in its
// checkpoint's tree.
var ErrNotIncluded = errors.New("audit: record not in the checkpoint's tree")

// CheckInclusion checks p offline: its checkpoint signed by every key in keys (the
// writer's, and the witness's to rely on the witness), and the record at p.Index in the
// checkpoint's tree. It returns the checkpoint.
func CheckInclusion(p InclusionProof, keys ...*NoteVerifier) (Checkpoint, error) {
	vs := make([]note.Verifier, len(keys))
	for i, k := range keys {
		vs[i] = k
	}
	_, c, err := OpenCheckpoint([]byte(p.Checkpoint), vs...)
	if err != nil {
		return c, err
	}
	if c.Size != p.TreeSize || p.Index >= c.Size {
		return c, fmt.Errorf("%w: index %d, tree size %d, checkpoint of %d records", ErrNotIncluded, p.Index, p.TreeSize, c.Size)
	}
	if len(p.Proof) > 64 || len(p.Record) > maxRecordBytes || bytes.ContainsAny([]byte(p.Record), "\n") {
		return c, fmt.Errorf("%w: malformed proof", ErrNotIncluded)
	}
	proof := make(tlog.RecordProof, len(p.Proof))
	for i, s := range p.Proof {
		b, err := base64.StdEncoding.DecodeString(s)
		if err != nil || len(b) != tlog.HashSize {
			return c, fmt.Errorf("%w: proof hash %d is not 32 bytes of base64", ErrNotIncluded, i)
		}
		copy(proof[i][:], b)
	}
	if err := tlog.CheckRecord(proof, int64(c.Size), c.Hash, int64(p.Index), tlog.RecordHash([]byte(p.Record))); err != nil {
		return c, fmt.Errorf("%w: %w", ErrNotIncluded, err)
	}
	return c, nil
}
