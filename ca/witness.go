package ca

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/atomicfile"
	"github.com/agentmesh/agentmesh/meshapi"
)

// The CA witnesses the proxies' audit logs (docs/audit.md): it binds each host's
// audit key to the host's origin at its first checkpoint, cosigns every later
// checkpoint that extends the one it holds, and refuses, records and counts one that
// does not. What it holds of a log lives in StateDir/witness/, one file per origin,
// written atomically before the cosigned checkpoint is answered: a CA that crashed
// never forgets a checkpoint it cosigned.

const (
	// witnessHistory bounds the accepted checkpoints kept per origin.
	witnessHistory = 1024
	// maxProofHashes bounds a consistency proof: at most two hashes per tree level.
	maxProofHashes = 2 * 64
)

// witnessState is a witnessed log's standing (the state label, WitnessedLog.State).
type witnessState string

const (
	witnessOK           witnessState = "ok"
	witnessStale        witnessState = "stale"        // no checkpoint for longer than Config.WitnessStaleAfter
	witnessInconsistent witnessState = "inconsistent" // a checkpoint was refused as inconsistent; until forgotten
)

var allWitnessStates = []witnessState{witnessOK, witnessStale, witnessInconsistent}

// checkpointResult is the outcome of a POSTed checkpoint (the result label).
type checkpointResult string

const (
	checkpointAccepted     checkpointResult = "accepted"
	checkpointConflict     checkpointResult = "conflict"     // OldSize is not the size held
	checkpointInconsistent checkpointResult = "inconsistent" // does not extend the one held
	checkpointInvalid      checkpointResult = "invalid"      // malformed, badly signed, another origin or key
)

var allCheckpointResults = []checkpointResult{checkpointAccepted, checkpointConflict, checkpointInconsistent, checkpointInvalid}

// witnessRecord is what the CA holds of one host's log, the content of its file.
// Immutable once published.
type witnessRecord struct {
	Origin string `json:"origin"`
	// Host is the SPIFFE ID whose checkpoints these are.
	Host string `json:"host"`
	// Key is the writer's verifier key, bound at the first checkpoint.
	Key string `json:"key"`
	// Cosigned is the latest checkpoint accepted, with the CA's cosignature.
	Cosigned string `json:"cosigned"`
	// History holds the accepted checkpoints, oldest first, the latest included,
	// bounded by witnessHistory.
	History  []meshapi.CheckpointSummary `json:"history"`
	LastSeen time.Time                   `json:"last_seen"`
	// Refused is the first checkpoint refused as inconsistent: the log's state stays
	// inconsistent until an operator forgets it.
	Refused *refusedCheckpoint `json:"refused,omitempty"`

	// CACosigned is the latest checkpoint of the CA's own log this host cosigned, at
	// CATime: the CA's log witnessed.
	CACosigned string    `json:"ca_cosigned,omitempty"`
	CASize     uint64    `json:"ca_size,omitempty"`
	CATime     time.Time `json:"ca_time,omitzero"`
}

// refusedCheckpoint is a checkpoint the witness refused as inconsistent.
type refusedCheckpoint struct {
	Size   uint64    `json:"size"`
	Hash   string    `json:"hash"`
	Time   time.Time `json:"time"`
	Reason string    `json:"reason"`
}

// latest is the checkpoint held: the last of History.
func (r *witnessRecord) latest() meshapi.CheckpointSummary {
	if r == nil || len(r.History) == 0 {
		return meshapi.CheckpointSummary{}
	}
	return r.History[len(r.History)-1]
}

// checkpoint is latest as an audit.Checkpoint of r's origin.
func (r *witnessRecord) checkpoint() (audit.Checkpoint, error) {
	l := r.latest()
	c := audit.Checkpoint{Origin: r.Origin, Size: l.Size}
	h, err := base64.StdEncoding.DecodeString(l.Hash)
	if err != nil || len(h) != len(c.Hash) {
		return c, fmt.Errorf("%w: held checkpoint of %s has a malformed hash", audit.ErrCheckpoint, r.Origin)
	}
	copy(c.Hash[:], h)
	return c, nil
}

// state is r's standing at now.
func (r *witnessRecord) state(now time.Time, staleAfter time.Duration) witnessState {
	switch {
	case r.Refused != nil:
		return witnessInconsistent
	case now.Sub(r.LastSeen) > staleAfter:
		return witnessStale
	default:
		return witnessOK
	}
}

// accepted is r with c (cosigned: note) as its latest checkpoint, seen at now.
func (r *witnessRecord) accepted(c audit.Checkpoint, cosigned []byte, now time.Time) *witnessRecord {
	next := *r
	next.Cosigned = string(cosigned)
	next.LastSeen = now
	sum := meshapi.CheckpointSummary{Size: c.Size, Hash: hashString(c.Hash), Time: now}
	if l := r.latest(); len(r.History) > 0 && l.Size == sum.Size {
		// The same checkpoint again (same size, and Cosign checked the same hash).
		next.History = r.History
		return &next
	}
	h := append(slices.Clone(r.History), sum)
	if len(h) > witnessHistory {
		h = h[len(h)-witnessHistory:]
	}
	next.History = h
	return &next
}

// witnessStore holds the witnessed logs. Readers load the map and each slot's record
// without a lock; a checkpoint of an origin serialises on its slot's mutex, adding or
// removing an origin on the store's.
type witnessStore struct {
	dir  string
	mu   sync.Mutex // serialises changes of logs (slots added, removed)
	logs atomic.Pointer[map[string]*witnessSlot]
}

type witnessSlot struct {
	mu   sync.Mutex // serialises this origin's changes, persisted included
	rec  atomic.Pointer[witnessRecord]
	gone bool // guarded by mu: forgotten; a request that waited looks the origin up again
}

// slots is the map in force.
func (ws *witnessStore) slots() map[string]*witnessSlot {
	if m := ws.logs.Load(); m != nil {
		return *m
	}
	return nil
}

// records is every witnessed log's record, in no order.
func (ws *witnessStore) records() []*witnessRecord {
	var out []*witnessRecord
	for _, s := range ws.slots() {
		if r := s.rec.Load(); r != nil {
			out = append(out, r)
		}
	}
	return out
}

// lock returns origin's slot locked, creating it.
func (ws *witnessStore) lock(origin string) *witnessSlot {
	for {
		s, ok := ws.slots()[origin]
		if !ok {
			ws.mu.Lock()
			if s, ok = ws.slots()[origin]; !ok {
				m := cloneSlots(ws.slots())
				s = &witnessSlot{}
				m[origin] = s
				ws.logs.Store(&m)
			}
			ws.mu.Unlock()
		}
		s.mu.Lock()
		if !s.gone {
			return s
		}
		s.mu.Unlock()
	}
}

// remove forgets origin: its file is deleted, then its slot. It returns the record
// held, nil when none.
func (ws *witnessStore) remove(origin string) (*witnessRecord, error) {
	ws.mu.Lock()
	defer ws.mu.Unlock()
	s, ok := ws.slots()[origin]
	if !ok {
		return nil, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := os.Remove(witnessFile(ws.dir, origin)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("forget %s: %w", origin, err)
	}
	s.gone = true
	m := cloneSlots(ws.slots())
	delete(m, origin)
	ws.logs.Store(&m)
	return s.rec.Load(), nil
}

func cloneSlots(m map[string]*witnessSlot) map[string]*witnessSlot {
	out := make(map[string]*witnessSlot, len(m)+1)
	for k, v := range m {
		out[k] = v
	}
	return out
}

// witnessFile is origin's file in dir: the origin path-escaped, so that its slashes
// cannot leave the directory.
func witnessFile(dir, origin string) string {
	return filepath.Join(dir, url.PathEscape(origin)+".json")
}

// persist writes rec to its file atomically.
func (ws *witnessStore) persist(rec *witnessRecord) error {
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return fmt.Errorf("encode witness record of %s: %w", rec.Origin, err)
	}
	return atomicfile.Write(witnessFile(ws.dir, rec.Origin), b, 0o600)
}

// loadWitness reads every witnessed log of dir (created 0700 when missing). A record
// that does not parse, is not of its file's origin, or whose checkpoint does not verify
// with its key and witness's is an error naming the file: dropping it would let its
// host start a new log unnoticed.
func loadWitness(dir string, witness note.Verifier) (*witnessStore, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("witness directory: %w", err)
	}
	names, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		return nil, fmt.Errorf("witness directory: %w", err)
	}
	ws := &witnessStore{dir: dir}
	m := make(map[string]*witnessSlot, len(names))
	for _, name := range names {
		rec, err := readWitnessRecord(name, witness)
		if err != nil {
			return nil, fmt.Errorf("%w: witness record %s: %w", ErrInvalidConfig, name, err)
		}
		s := &witnessSlot{}
		s.rec.Store(rec)
		m[rec.Origin] = s
	}
	ws.logs.Store(&m)
	return ws, nil
}

func readWitnessRecord(name string, witness note.Verifier) (*witnessRecord, error) {
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, err
	}
	return decodeWitnessRecord(b, name, witness)
}

// decodeWitnessRecord decodes the content of the witness file name: strict JSON, of
// the file's origin, its latest checkpoint signed by its key and witness's and the
// last of its history.
func decodeWitnessRecord(b []byte, name string, witness note.Verifier) (*witnessRecord, error) {
	var rec witnessRecord
	if err := meshapi.DecodeStrict(bytes.NewReader(b), &rec); err != nil {
		return nil, err
	}
	if witnessFile(filepath.Dir(name), rec.Origin) != name {
		return nil, fmt.Errorf("origin %q is not the file's", rec.Origin)
	}
	writer, err := audit.ParseVerifierKey(rec.Key)
	if err != nil {
		return nil, fmt.Errorf("key: %w", err)
	}
	_, c, err := audit.OpenCheckpoint([]byte(rec.Cosigned), writer, witness)
	if err != nil {
		return nil, fmt.Errorf("cosigned: %w", err)
	}
	if held, err := rec.checkpoint(); err != nil || held != c {
		return nil, fmt.Errorf("cosigned: checkpoint is not the last of history")
	}
	return &rec, nil
}

// checkpointRequest is a POSTed checkpoint, parsed.
type checkpointRequest struct {
	msg     []byte
	writer  *audit.NoteVerifier
	c       audit.Checkpoint
	oldSize uint64
	proof   tlog.TreeProof
}

// parseCheckpointRequest checks req for origin: the key parses, the checkpoint is
// signed by it and of origin, the proof is base64 hashes. Its errors are the request's
// fault (invalid).
func parseCheckpointRequest(req meshapi.CheckpointRequest, origin string) (checkpointRequest, error) {
	writer, err := audit.ParseVerifierKey(req.Key)
	if err != nil {
		return checkpointRequest{}, err
	}
	msg := []byte(req.Checkpoint)
	_, c, err := audit.OpenCheckpoint(msg, writer)
	if err != nil {
		return checkpointRequest{}, err
	}
	if c.Origin != origin {
		return checkpointRequest{}, fmt.Errorf("%w: %q, the caller's is %q", errOtherOrigin, c.Origin, origin)
	}
	proof, err := decodeProof(req.Proof)
	if err != nil {
		return checkpointRequest{}, err
	}
	return checkpointRequest{msg: msg, writer: writer, c: c, oldSize: req.OldSize, proof: proof}, nil
}

// decodeProof decodes base64 hashes.
func decodeProof(hashes []string) (tlog.TreeProof, error) {
	if len(hashes) > maxProofHashes {
		return nil, fmt.Errorf("%w: proof of %d hashes", audit.ErrCheckpoint, len(hashes))
	}
	proof := make(tlog.TreeProof, len(hashes))
	for i, s := range hashes {
		h, err := base64.StdEncoding.DecodeString(s)
		if err != nil || len(h) != len(proof[i]) {
			return nil, fmt.Errorf("%w: proof hash %d is not 32 bytes of base64", audit.ErrCheckpoint, i)
		}
		copy(proof[i][:], h)
	}
	return proof, nil
}

// hashString is a tree hash in base64, as checkpoints write it.
func hashString(h tlog.Hash) string { return base64.StdEncoding.EncodeToString(h[:]) }

// encodeProof is decodeProof's inverse.
func encodeProof(p tlog.TreeProof) []string {
	out := make([]string, len(p))
	for i, h := range p {
		out[i] = base64.StdEncoding.EncodeToString(h[:])
	}
	return out
}

// errKeyChanged: the checkpoint is signed by another key than the origin's.
var errKeyChanged = errors.New("checkpoint signed by another key than the one bound to the origin")

// decideCheckpoint is the witness's decision on req given held (nil: a first
// checkpoint). Accepted, it returns the record to persist and answer with; otherwise
// the result and why. witness cosigns.
func decideCheckpoint(held *witnessRecord, host string, req checkpointRequest, witness note.Signer, now time.Time) (*witnessRecord, checkpointResult, error) {
	if held == nil {
		if req.oldSize != 0 {
			return nil, checkpointConflict, &audit.WitnessConflict{}
		}
		held = &witnessRecord{Origin: req.c.Origin, Host: host, Key: req.writer.Key()}
	}
	if bound, err := audit.ParseVerifierKey(held.Key); err != nil || !bound.Equal(req.writer) {
		return nil, checkpointInvalid, errKeyChanged
	}
	if l := held.latest(); l.Size != req.oldSize {
		return nil, checkpointConflict, &audit.WitnessConflict{Size: l.Size, Cosigned: []byte(held.Cosigned)}
	}
	var last *audit.Checkpoint
	if len(held.History) > 0 {
		c, err := held.checkpoint()
		if err != nil {
			return nil, checkpointInvalid, err
		}
		last = &c
	}
	cosigned, c, err := audit.Cosign(req.msg, req.writer, last, req.proof, witness)
	switch {
	case errors.Is(err, audit.ErrInconsistent):
		return nil, checkpointInconsistent, err
	case err != nil:
		return nil, checkpointInvalid, err
	}
	return held.accepted(c, cosigned, now), checkpointAccepted, nil
}

// inconsistent is held with req's checkpoint recorded as refused (the first one
// refused stays) and seen at now.
func (r *witnessRecord) inconsistent(req checkpointRequest, reason error, now time.Time) *witnessRecord {
	next := *r
	next.LastSeen = now
	if next.Refused == nil {
		next.Refused = &refusedCheckpoint{Size: req.c.Size, Hash: hashString(req.c.Hash),
			Time: now, Reason: strings.TrimPrefix(reason.Error(), "audit: ")}
	}
	return &next
}
