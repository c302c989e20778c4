package audit

import (
	"errors"
	"fmt"
	"math/bits"
	"os"
	"sync/atomic"

	"golang.org/x/mod/sumdb/tlog"
)

// The Merkle tree over the records (RFC 6962 hashing, golang.org/x/mod/sumdb/tlog): leaf i
// is the record with seq i+1, hashed with tlog.RecordHash over its line without the
// newline. The writer keeps the tree's stored hashes (tlog.StoredHashIndex layout, 32 bytes
// each) in Path + ".hashes" for proofs, and the right edge of the tree (the roots of its
// complete subtrees, one per set bit of the size) in memory, so appending a record costs
// one leaf hash and one node hash per trailing one bit of the size, and no reads.
//
// The hash file is derived data, never trusted by Verify: a crash may leave it shorter
// or longer than the records, or with unflushed blocks. It is fsynced before every
// checkpoint is written, so Open trusts it up to the size of the checkpoint in
// Path + ".checkpoint" (when its root matches) and recomputes the rest from the records.

// hashesSuffix and the other suffixes name the log's companion files.
const (
	hashesSuffix     = ".hashes"
	checkpointSuffix = ".checkpoint"
	cosignedSuffix   = ".cosigned"
)

// edge is the right edge of a tree of size n: edge[l] is the root of the complete
// subtree of 2^l leaves that bit l of n stands for (unused where the bit is clear).
type edge struct {
	n     uint64
	roots [64]tlog.Hash
}

// add appends a leaf and appends to stored the stored hashes it creates, in storage
// order (tlog.StoredHashIndex).
func (e *edge) add(leaf tlog.Hash, stored []byte) []byte {
	stored = append(stored, leaf[:]...)
	h := leaf
	// Each trailing one bit of n is a complete subtree that the new leaf completes.
	m := bits.TrailingZeros64(^e.n)
	for l := range m {
		h = tlog.NodeHash(e.roots[l], h)
		stored = append(stored, h[:]...)
	}
	e.roots[m] = h
	e.n++
	return stored
}

// root is the tree hash of the n leaves, tlog.TreeHash computed from the edge.
func (e *edge) root() tlog.Hash {
	var h tlog.Hash
	first := true
	for l := range 64 {
		if e.n&(1<<l) == 0 {
			continue
		}
		if first {
			h, first = e.roots[l], false
			continue
		}
		h = tlog.NodeHash(e.roots[l], h)
	}
	return h
}

// treeState is what readers see of the tree: the durable size and its root, published
// by the writer after each commit.
type treeState struct {
	size uint64
	root tlog.Hash
}

// tree is the writer's Merkle state and the hash file. edge, buf and f's writes belong to
// the writer goroutine; state and hashed are read by proofs on any goroutine.
type tree struct {
	path string
	f    *os.File
	edge edge
	// buf holds stored hashes computed but not yet written to f (a failed batch is cut
	// back; a failed file write is retried with the next batch).
	buf   []byte
	state atomic.Pointer[treeState]
	// hashed is the number of stored hashes written to f: proofs read below it only.
	hashed atomic.Int64
}

func (t *tree) addLine(line []byte) {
	t.buf = t.edge.add(tlog.RecordHash(line), t.buf)
}

// flush writes the buffered stored hashes after those already in the file, then
// publishes the new size. A write failure is returned and the hashes stay buffered; the
// records are durable regardless, and proofs stop at what the file holds.
func (t *tree) flush() error {
	// Publish after the write, so a reader given the new size finds its hashes.
	defer t.state.Store(&treeState{size: t.edge.n, root: t.edge.root()})
	if len(t.buf) == 0 {
		return nil
	}
	off := t.hashed.Load() * tlog.HashSize
	if _, err := t.f.WriteAt(t.buf, off); err != nil {
		return fmt.Errorf("write %s: %w", t.path, err)
	}
	t.hashed.Add(int64(len(t.buf) / tlog.HashSize))
	t.buf = t.buf[:0]
	return nil
}

// current is the durable size and root.
func (t *tree) current() treeState {
	if s := t.state.Load(); s != nil {
		return *s
	}
	return treeState{}
}

// ReadHashes implements tlog.HashReader over the hash file.
func (t *tree) ReadHashes(indexes []int64) ([]tlog.Hash, error) {
	n := t.hashed.Load()
	out := make([]tlog.Hash, len(indexes))
	for i, x := range indexes {
		if x < 0 || x >= n {
			return nil, fmt.Errorf("audit: stored hash %d not in %s (%d hashes)", x, t.path, n)
		}
		if _, err := t.f.ReadAt(out[i][:], x*tlog.HashSize); err != nil {
			return nil, fmt.Errorf("audit: read %s: %w", t.path, err)
		}
	}
	return out, nil
}

// openTree opens the hash file of the log at path, which holds records durable records,
// trusting the file up to trusted records (the size of the last checkpoint, whose root
// is trustedRoot) and recomputing the rest from the records.
func openTree(path string, records, trusted uint64, trustedRoot tlog.Hash) (*tree, error) {
	hpath := path + hashesSuffix
	f, err := os.OpenFile(hpath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", hpath, err)
	}
	t := &tree{path: hpath, f: f}
	if err := t.recover(path, records, trusted, trustedRoot); err != nil {
		_ = f.Close() // the recovery error is the one to report
		return nil, err
	}
	return t, nil
}

func (t *tree) recover(path string, records, trusted uint64, trustedRoot tlog.Hash) error {
	st, err := t.f.Stat()
	if err != nil {
		return fmt.Errorf("stat %s: %w", t.path, err)
	}
	trusted = min(trusted, records)
	if st.Size() < tlog.StoredHashCount(int64(trusted))*tlog.HashSize {
		trusted = 0
	}
	t.hashed.Store(st.Size() / tlog.HashSize)
	if trusted > 0 {
		e, err := loadEdge(t, trusted)
		if err != nil || e.root() != trustedRoot {
			trusted = 0 // the file does not hold what the checkpoint says: rebuild it
		} else {
			t.edge = e
		}
	}
	if trusted == 0 {
		t.edge = edge{}
	}
	keep := tlog.StoredHashCount(int64(trusted))
	if err := t.f.Truncate(keep * tlog.HashSize); err != nil {
		return fmt.Errorf("truncate %s: %w", t.path, err)
	}
	t.hashed.Store(keep)
	if trusted == records {
		t.state.Store(&treeState{size: records, root: t.edge.root()})
		return nil
	}
	err = Scan(path, trusted+1, func(seq uint64, line []byte) error {
		if seq > records {
			return ErrStop
		}
		t.addLine(line)
		if len(t.buf) >= 1<<20 {
			return t.flush()
		}
		return nil
	})
	if err == nil && t.edge.n != records {
		err = fmt.Errorf("%w: %d records found, %d expected", ErrCorrupt, t.edge.n, records)
	}
	if err == nil {
		err = t.flush()
	}
	if err == nil {
		err = t.f.Sync()
	}
	if err != nil {
		return fmt.Errorf("rebuild %s: %w", t.path, err)
	}
	return nil
}

// loadEdge reads the right edge of the tree of size n from the hash file.
func loadEdge(r tlog.HashReader, n uint64) (edge, error) {
	e := edge{n: n}
	for l := range 64 {
		if n&(1<<l) == 0 {
			continue
		}
		hs, err := r.ReadHashes([]int64{tlog.StoredHashIndex(l, int64(n>>l)-1)})
		if err != nil {
			return e, err
		}
		e.roots[l] = hs[0]
	}
	return e, nil
}

func (t *tree) close() error {
	err := t.flush()
	if serr := t.f.Sync(); err == nil {
		err = serr
	}
	if cerr := t.f.Close(); err == nil {
		err = cerr
	}
	return err
}

// errNoProof is wrapped when a proof is asked of sizes the log does not hold.
var errNoProof = errors.New("audit: no such proof")

// ProveInclusion returns the proof that the record at index (seq index+1) is in the tree
// of size size, which must be at most the durable size. Safe for concurrent use.
func (l *Log) ProveInclusion(index, size uint64) (tlog.RecordProof, error) {
	if cur := l.tree.current().size; index >= size || size > cur {
		return nil, fmt.Errorf("%w: index %d in size %d (log holds %d)", errNoProof, index, size, cur)
	}
	p, err := tlog.ProveRecord(int64(size), int64(index), l.tree)
	if err != nil {
		return nil, fmt.Errorf("audit: prove record %d: %w", index, err)
	}
	return p, nil
}

// ProveConsistency returns the proof that the tree of size old is a prefix of the tree
// of size size, which must be at most the durable size. Sizes 0 and old == size need no
// hashes: the proof is empty. Safe for concurrent use.
func (l *Log) ProveConsistency(old, size uint64) (tlog.TreeProof, error) {
	if cur := l.tree.current().size; old > size || size > cur {
		return nil, fmt.Errorf("%w: sizes %d to %d (log holds %d)", errNoProof, old, size, cur)
	}
	if old == 0 || old == size {
		return tlog.TreeProof{}, nil
	}
	p, err := tlog.ProveTree(int64(size), int64(old), l.tree)
	if err != nil {
		return nil, fmt.Errorf("audit: prove tree %d to %d: %w", old, size, err)
	}
	return p, nil
}

// treeHashAt is the root of the log's tree at size n (at most the durable size).
func (l *Log) treeHashAt(n uint64) (tlog.Hash, error) {
	if cur := l.tree.current(); n == cur.size {
		return cur.root, nil
	}
	return tlog.TreeHash(int64(n), l.tree)
}
