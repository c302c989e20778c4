package audit

import (
	"errors"
	"fmt"
	"os"
	"slices"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

// VerifyOptions says what VerifyLog checks the records against, besides their chain.
type VerifyOptions struct {
	// Checkpoint is a signed checkpoint of the log (the writer's Path + ".checkpoint");
	// nil: none. The log must hold at least its size and have its root at that size.
	Checkpoint []byte
	// Key is the writer's verifier key (NoteVerifier.Key). Checkpoint's signature is
	// checked with it, else with the key the Witness bound to the log; with neither,
	// Checkpoint's root is still compared but its signature is not checked
	// (VerifyReport.CheckpointSigned is false).
	Key string
	// Witness is what the log's witness holds of it; nil: not checked.
	Witness *WitnessView
}

// WitnessView is what a witness holds of one log (meshapi.WitnessedLog, parsed).
type WitnessView struct {
	// Key is the writer's verifier key the witness bound to the log's origin.
	Key string
	// WitnessKeys are the witnesses' verifier keys: Latest must carry a signature by one.
	WitnessKeys []string
	// Latest is the latest cosigned checkpoint (signed note).
	Latest []byte
	// History are earlier accepted checkpoints, oldest first.
	History []Checkpoint
}

// VerifyReport is what VerifyLog found.
type VerifyReport struct {
	Records uint64    // records in the log
	Root    tlog.Hash // the tree hash of all of them
	// Checkpoint is the checkpoint checked (nil: none); CheckpointSigned whether its
	// signature was checked too.
	Checkpoint       *Checkpoint
	CheckpointSigned bool
	// Witnessed is the witness's latest cosigned checkpoint, checked (nil: no witness).
	Witnessed *Checkpoint
	// TornBytes is the length of an incomplete last line of the active file: a write in
	// progress or cut short by a crash, never acknowledged, so not a record.
	TornBytes int64
}

// VerifyLog checks the log at path, its segments then its active file: the hash chain of
// every record (as Verify does, naming the first bad one), then the Merkle tree of all of
// them against opts.Checkpoint and opts.Witness. A record missing after a checkpointed or
// witnessed size (a cut tail) is named by its index; a log rewritten consistently (chain
// recomputed) is named by the first witnessed checkpoint it no longer matches: "records in
// [a, b) differ from what the witness saw", the VerifyError's Seq being a+1. Problems with
// the log are *VerifyError; bad options (a malformed checkpoint, a key that did not sign
// it) wrap ErrCheckpoint; I/O errors are returned wrapped. Memory is bounded by the
// longest line.
func VerifyLog(path string, opts VerifyOptions) (VerifyReport, error) {
	var rep VerifyReport
	w, err := openWitnessView(opts.Witness)
	if err != nil {
		return rep, err
	}
	key := opts.Key
	if w != nil {
		if key != "" {
			v, err := ParseVerifierKey(key)
			if err != nil {
				return rep, fmt.Errorf("key: %w", err)
			}
			if !w.key.Equal(v) {
				return rep, fmt.Errorf("%w: the witness bound another key to this log than the one given", ErrCheckpoint)
			}
		}
		key = w.key.Key()
	}
	// A local checkpoint that does not verify is reported after the chain and the
	// witness have had their say: the witness names what a rewrite changed, which a
	// forged checkpoint would otherwise hide.
	cp, signed, cpErr := openLocalCheckpoint(opts.Checkpoint, key)
	// The sizes whose roots are compared, computed on the way.
	var want []Checkpoint
	if cp != nil {
		want = append(want, *cp)
	}
	if w != nil {
		want = append(want, w.history...)
	}
	roots, err := walkLog(path, &rep, want)
	if err != nil {
		return rep, err
	}
	if w != nil {
		if err := checkRoots(rep.Records, roots, w.history, "the witness"); err != nil {
			return rep, err
		}
		rep.Witnessed = &w.latest
	}
	if cpErr != nil {
		return rep, cpErr
	}
	if cp != nil {
		if err := checkRoots(rep.Records, roots, []Checkpoint{*cp}, "the checkpoint"); err != nil {
			return rep, err
		}
		rep.Checkpoint, rep.CheckpointSigned = cp, signed
	}
	return rep, nil
}

// witnessView is a WitnessView whose Latest was checked: signed by the writer's key and a
// witness's. history ends with latest.
type witnessView struct {
	key     *NoteVerifier
	latest  Checkpoint
	history []Checkpoint
}

func openWitnessView(v *WitnessView) (*witnessView, error) {
	if v == nil {
		return nil, nil
	}
	if len(v.Latest) == 0 {
		return nil, fmt.Errorf("%w: the witness holds no checkpoint of this log", ErrCheckpoint)
	}
	key, err := ParseVerifierKey(v.Key)
	if err != nil {
		return nil, fmt.Errorf("witness: writer key: %w", err)
	}
	_, c, err := OpenCheckpoint(v.Latest, key)
	if err != nil {
		return nil, fmt.Errorf("witness: latest: %w", err)
	}
	if !cosignedByOneOf(v.Latest, v.WitnessKeys, key) {
		return nil, fmt.Errorf("%w: witness: latest checkpoint carries no valid witness signature", ErrCheckpoint)
	}
	hist := make([]Checkpoint, 0, len(v.History)+1)
	for _, h := range v.History {
		if h.Size <= c.Size {
			h.Origin = c.Origin
			hist = append(hist, h)
		}
	}
	hist = append(hist, c)
	slices.SortStableFunc(hist, func(a, b Checkpoint) int { return int64Cmp(a.Size, b.Size) })
	return &witnessView{key: key, latest: c, history: hist}, nil
}

// cosignedByOneOf reports whether msg carries a valid signature by one of keys other
// than the writer's.
func cosignedByOneOf(msg []byte, keys []string, writer *NoteVerifier) bool {
	for _, k := range keys {
		v, err := ParseVerifierKey(k)
		if err != nil || v.Equal(writer) {
			continue
		}
		if _, _, err := OpenCheckpoint(msg, writer, v); err == nil {
			return true
		}
	}
	return false
}

// openLocalCheckpoint parses the writer's checkpoint, checking its signature when key is
// given.
func openLocalCheckpoint(b []byte, key string) (*Checkpoint, bool, error) {
	if b == nil {
		return nil, false, nil
	}
	if key == "" {
		n, err := note.Open(b, note.VerifierList())
		var unknown *note.UnverifiedNoteError
		if errors.As(err, &unknown) {
			n, err = unknown.Note, nil
		}
		if err != nil {
			return nil, false, fmt.Errorf("%w: checkpoint: %w", ErrCheckpoint, err)
		}
		c, err := ParseCheckpoint(n.Text)
		if err != nil {
			return nil, false, err
		}
		return &c, false, nil
	}
	v, err := ParseVerifierKey(key)
	if err != nil {
		return nil, false, fmt.Errorf("checkpoint key: %w", err)
	}
	_, c, err := OpenCheckpoint(b, v)
	if err != nil {
		return nil, false, fmt.Errorf("checkpoint: %w", err)
	}
	return &c, true, nil
}

// walkLog checks the chain of every file of the log at path, fills rep and returns the
// roots of the tree at the sizes of want.
func walkLog(path string, rep *VerifyReport, want []Checkpoint) (map[uint64]tlog.Hash, error) {
	sizes := map[uint64]bool{}
	for _, c := range want {
		sizes[c.Size] = true
	}
	roots := map[uint64]tlog.Hash{}
	var (
		c chain
		e edge
	)
	var scratch []byte
	leaf := func(line []byte) {
		scratch = e.add(tlog.RecordHash(line), scratch[:0])
		if sizes[e.n] {
			roots[e.n] = e.root()
		}
	}
	for relists := 0; ; relists++ {
		segs, err := Segments(path)
		if err != nil {
			return nil, err
		}
		err = walkFiles(segs, &c, leaf, rep)
		ve, ok := errors.AsType[*VerifyError](err)
		if ok && ve.File == path && ve.Line == 1 && relists < maxScanRetries && rotatedAt(path, c.n+1) {
			continue // the log rotated under the walk: read the new segment, then the new active file
		}
		if err != nil {
			return nil, err
		}
		rep.Records, rep.Root = e.n, e.root()
		return roots, nil
	}
}

// walkFiles checks the files of segs after the c.n records already checked: segments are
// read whole, so those starting at or before c.n are done.
func walkFiles(segs []Segment, c *chain, leaf func([]byte), rep *VerifyReport) error {
	for i, s := range segs {
		active := i == len(segs)-1
		if s.First != 0 && s.First <= c.n {
			continue
		}
		if s.First != 0 && s.First != c.n+1 {
			return &VerifyError{File: s.Path, Seq: c.n + 1, Line: 1,
				Reason: fmt.Sprintf("segment named for seq %d follows seq %d: a segment was removed or renamed", s.First, c.n)}
		}
		torn, err := verifyFile(s.Path, c, leaf, active)
		if err != nil {
			return err
		}
		if torn > 0 && !active {
			return &VerifyError{File: s.Path, Seq: c.n + 1, Line: c.line + 1, Reason: "incomplete last line in a segment"}
		}
		rep.TornBytes = torn
	}
	return nil
}

// rotatedAt reports whether the log at path now has a segment starting at seq first.
func rotatedAt(path string, first uint64) bool {
	_, err := os.Stat(SegmentName(path, first))
	return err == nil
}

// verifyFile checks one file's records with c and returns the length of an incomplete
// last line. The active file may not exist yet.
func verifyFile(path string, c *chain, leaf func([]byte), active bool) (int64, error) {
	f, err := os.Open(path)
	if active && errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("audit: verify: %w", err)
	}
	defer func() { _ = f.Close() }() // read only
	c.file = path
	var read int64
	torn, err := c.read(f, func(line []byte) {
		read += int64(len(line)) + 1
		leaf(line)
	})
	if err != nil || !torn {
		return 0, err
	}
	st, err := f.Stat()
	if err != nil {
		return 0, fmt.Errorf("audit: verify: %w", err)
	}
	return st.Size() - read, nil
}

// checkRoots compares the tree of the log (records long, roots at the sizes computed)
// with the checkpoints cps, smallest first, naming the first one it does not match.
func checkRoots(records uint64, roots map[uint64]tlog.Hash, cps []Checkpoint, by string) error {
	var good uint64 // the largest size that matched
	for _, c := range cps {
		if c.Size > records {
			return &VerifyError{Seq: records + 1,
				Reason: fmt.Sprintf("records from index %d on are missing: %s committed to %d records", records, by, c.Size)}
		}
		if c.Size == 0 {
			continue
		}
		if roots[c.Size] != c.Hash {
			return &VerifyError{Seq: good + 1,
				Reason: fmt.Sprintf("records in [%d, %d) differ from what %s saw", good, c.Size, by)}
		}
		good = max(good, c.Size)
	}
	return nil
}
