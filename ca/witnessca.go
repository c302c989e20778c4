package ca

import (
	"cmp"
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"time"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

// The CA's own log is witnessed by the proxies: every answer to a checkpoint carries
// the CA's latest checkpoint with a consistency proof from the one that proxy last
// cosigned, and the proxy's next request returns it cosigned. The CA keeps the latest
// per host; together they are what GET /audit/v1/checkpoints serves for the CA's
// origin, so the CA is never its own witness.

// CheckpointLog is the CA's own audit log with checkpoints: an *audit.Log whose Config
// has the CA's Origin and audit key as Signer.
type CheckpointLog interface {
	Append(audit.Event) error
	// Sync returns once the records appended before are durable.
	Sync(ctx context.Context) error
	// Checkpoint signs a checkpoint of the durable records now, if the log grew.
	Checkpoint(ctx context.Context) error
	// Latest is the latest signed checkpoint of the durable records; a nil note when
	// none yet.
	Latest() ([]byte, audit.Checkpoint)
	// ProveConsistency proves the tree of size oldSize a prefix of that of size newSize.
	ProveConsistency(oldSize, newSize uint64) (tlog.TreeProof, error)
}

// caCheckpoint is the CA's latest checkpoint and the consistency proof to it from
// size from (none when from is 0, not below it, or beyond it: the proxy then checks
// the size itself). Empty without a log or a checkpoint yet.
func (s *Server) caCheckpoint(from uint64) (string, []string) {
	if s.caLog == nil {
		return "", nil
	}
	msg, c := s.caLog.Latest()
	if msg == nil {
		return "", nil
	}
	if from == 0 || from >= c.Size {
		return string(msg), nil
	}
	proof, err := s.caLog.ProveConsistency(from, c.Size)
	if err != nil {
		// The proxy cannot check this checkpoint without the proof: it gets none
		// this time and asks again with its next checkpoint.
		s.log.Error("prove the ca's audit log consistent", keyErr, err)
		return "", nil
	}
	return string(msg), encodeProof(proof)
}

// withCACosigned is rec with cosigned (a checkpoint of the CA's log, origin caOrigin,
// signed by caKey and cosigned by the host's key) seen at now, unless it is older than
// the one rec holds. The same size again only refreshes the time: the CA's log did not
// grow, and the host still vouches for it.
func withCACosigned(rec *witnessRecord, cosigned string, host, caKey note.Verifier, caOrigin string, now time.Time) (*witnessRecord, error) {
	_, c, err := audit.OpenCheckpoint([]byte(cosigned), caKey, host)
	if err != nil {
		return rec, err
	}
	if c.Origin != caOrigin {
		return rec, fmt.Errorf("%w: cosigned origin %q is not the ca's", audit.ErrCheckpoint, c.Origin)
	}
	if rec.CACosigned != "" && c.Size < rec.CASize {
		return rec, nil
	}
	next := *rec
	next.CACosigned, next.CASize, next.CATime = cosigned, c.Size, now
	return &next, nil
}

// caWitnessed is what the proxies witnessed of the CA's log (origin, key caKey):
// Latest is the largest checkpoint some host cosigned, with the cosignatures of every
// host that cosigned that same checkpoint, WitnessKeys those hosts' keys; History the
// smaller checkpoints hosts hold, oldest first. False when no host cosigned one.
func caWitnessed(recs []*witnessRecord, caKey *audit.NoteVerifier, origin string, now time.Time, staleAfter time.Duration) (meshapi.WitnessedLog, bool) {
	type cosig struct {
		n    *note.Note
		c    audit.Checkpoint
		key  string
		seen time.Time
	}
	var all []cosig
	for _, r := range recs {
		if r.CACosigned == "" {
			continue
		}
		host, err := audit.ParseVerifierKey(r.Key)
		if err != nil {
			continue // checked when the record was loaded or accepted
		}
		n, c, err := audit.OpenCheckpoint([]byte(r.CACosigned), caKey, host)
		if err != nil {
			continue
		}
		all = append(all, cosig{n: n, c: c, key: host.Key(), seen: r.CATime})
	}
	if len(all) == 0 {
		return meshapi.WitnessedLog{}, false
	}
	slices.SortFunc(all, func(a, b cosig) int {
		return cmp.Or(cmp.Compare(a.c.Size, b.c.Size), a.seen.Compare(b.seen))
	})
	top := all[len(all)-1]
	merged := &note.Note{Text: top.n.Text}
	out := meshapi.WitnessedLog{Origin: origin, Key: caKey.Key()}
	type signer struct {
		name string
		hash uint32
	}
	seen := map[signer]bool{}
	var history []meshapi.CheckpointSummary
	for _, cs := range all {
		if out.LastSeen.Before(cs.seen) {
			out.LastSeen = cs.seen
		}
		if cs.c != top.c {
			sum := meshapi.CheckpointSummary{Size: cs.c.Size, Hash: hashString(cs.c.Hash), Time: cs.seen}
			if len(history) == 0 || history[len(history)-1].Size != sum.Size {
				history = append(history, sum)
			}
			continue
		}
		out.WitnessKeys = append(out.WitnessKeys, cs.key)
		for _, sig := range cs.n.Sigs {
			if k := (signer{sig.Name, sig.Hash}); !seen[k] {
				seen[k] = true
				merged.Sigs = append(merged.Sigs, sig)
			}
		}
	}
	msg, err := note.Sign(merged)
	if err != nil {
		return meshapi.WitnessedLog{}, false
	}
	out.Latest, out.History = string(msg), history
	out.State = string(witnessOK)
	if now.Sub(out.LastSeen) > staleAfter {
		out.State = string(witnessStale)
	}
	return out, true
}

// witnessKey is the CA's audit key as a note signer, with its verifier.
type witnessKey struct {
	*audit.NoteSigner
	verifier *audit.NoteVerifier
}

// initWitness prepares the witness: the CA's audit key from the token, the witnessed
// logs from StateDir/witness, the metrics and, with Config.OpenAuditLog, the CA's own
// log signing checkpoints with that key.
func (s *Server) initWitness() error {
	s.caOrigin = meshapi.CAAuditOrigin(s.cfg.TrustDomain)
	key := s.auth.AuditSigner()
	signer, err := audit.NewNoteSigner(s.caOrigin, key)
	if err != nil {
		return fmt.Errorf("audit key: %w", err)
	}
	verifier, err := audit.NewNoteVerifier(s.caOrigin, key.Public())
	if err != nil {
		return fmt.Errorf("audit key: %w", err)
	}
	s.auditSigner = witnessKey{NoteSigner: signer, verifier: verifier}
	if s.witness, err = loadWitness(filepath.Join(s.cfg.StateDir, dirWitness), verifier); err != nil {
		return err
	}
	s.wm = newWitnessMetrics(s)
	if s.cfg.OpenAuditLog != nil {
		if s.caLog, err = s.cfg.OpenAuditLog(key); err != nil {
			return err
		}
		s.cfg.Audit = s.caLog
	}
	return nil
}

// ownLogTimeout bounds the CA's last checkpoint at shutdown.
const ownLogTimeout = 5 * time.Second

// checkpointOwnLog signs a checkpoint of every record the CA wrote, once it has stopped
// serving and before the token closes: the audit key is in the token, so the log's own
// checkpoint at its shutdown, later, could not be signed.
func (s *Server) checkpointOwnLog(ctx context.Context) {
	if s.caLog == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), ownLogTimeout)
	defer cancel()
	if err := s.caLog.Sync(ctx); err != nil {
		s.log.Error("ca audit log not synced at shutdown", keyErr, err)
		return
	}
	if err := s.caLog.Checkpoint(ctx); err != nil {
		s.log.Error("ca audit checkpoint at shutdown failed", keyErr, err)
	}
}
