package rotator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"slices"

	"github.com/agentmesh/agentmesh/audit"
)

// ListableKeys is a PersistentKeys that lists the references of every key it holds,
// those an earlier process left included. *hsm.Keys satisfies it.
type ListableKeys interface {
	PersistentKeys
	// List returns the references (as Ref gives them) of the keys the store holds.
	List(ctx context.Context) ([]string, error)
}

// OrphanConfig says what DestroyOrphans looks at.
type OrphanConfig struct {
	// Keys is the key store shared by every rotator of the process.
	Keys ListableKeys
	// StateFiles are the Config.StateFile of every rotator that uses Keys: the key each
	// stored SVID names is kept, for the rotator's restore. A file that does not exist
	// names nothing.
	StateFiles []string
	// Audit receives one key_state record per key destroyed (to destroyed, cause
	// orphan, Label the key's reference). Nil: none.
	Audit Auditor
	// Logger: nil discards.
	Logger *slog.Logger
}

// DestroyOrphans destroys every key of cfg.Keys that no state file names: keys left by a
// process that ended (a crash, SIGKILL, a power cut) between making a key and destroying
// it, such as the key of an SVID in overlap or of an agent's identity, which a restarted
// process never uses again. It returns the references it destroyed. Call it once at
// start, before any rotator using the store runs: a key made by this process is named by
// no state file yet and would be taken for an orphan.
//
// An orphan is destroyed at once rather than after an overlap: the overlap keeps a
// superseded key for the connections it authenticated, and those ended with the process
// that held them; no certificate of an orphan is known to this process, so nothing can
// present it again. A state file that cannot be read (other than not existing) leaves
// every key in place: what it names is unknown, and a restore may still find it.
func DestroyOrphans(ctx context.Context, cfg OrphanConfig) ([]string, error) {
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	var keep []string
	for _, path := range cfg.StateFiles {
		ref, err := storedRef(path)
		if err != nil {
			return nil, fmt.Errorf("rotator: orphan keys: %w", err)
		}
		if ref != "" {
			keep = append(keep, ref)
		}
	}
	refs, err := cfg.Keys.List(ctx)
	if err != nil {
		return nil, fmt.Errorf("rotator: orphan keys: %w", err)
	}
	var destroyed []string
	var errs []error
	for _, ref := range refs {
		if slices.Contains(keep, ref) {
			continue
		}
		key, err := cfg.Keys.Open(ctx, ref)
		if err == nil {
			err = cfg.Keys.Destroy(ctx, key)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("rotator: destroy orphan key %s: %w", ref, err))
			continue
		}
		destroyed = append(destroyed, ref)
		if cfg.Audit != nil {
			if err := cfg.Audit.Append(&audit.KeyState{Key: audit.KeySVID, To: StateDestroyed, Cause: string(CauseOrphan), Label: ref}); err != nil {
				logger.LogAttrs(ctx, slog.LevelError, "audit key state", slog.Any(keyErr, err))
			}
		}
		logger.LogAttrs(ctx, slog.LevelInfo, "key state", slog.String(keyLabel, ref),
			slog.String(keyTo, string(StateDestroyed)), slog.String(keyCause, string(CauseOrphan)))
	}
	return destroyed, errors.Join(errs...)
}

// storedRef returns the key reference of the SVID stored in path, "" when there is no
// file or it is malformed (the restore then finds it unusable, and its key is an orphan
// like any other).
func storedRef(path string) (string, error) {
	if path == "" {
		return "", nil
	}
	b, err := readStateFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read stored svid: %w", err)
	}
	var st storedSVID
	if json.Unmarshal(b, &st) != nil || st.Format != stateFormat {
		return "", nil
	}
	return st.Key, nil
}
