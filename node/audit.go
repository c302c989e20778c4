package node

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/hsm"
	"github.com/agentmesh/agentmesh/internal/atomicfile"
	"github.com/agentmesh/agentmesh/meshapi"
)

const (
	// auditKeyFile, in the state directory, names the audit signing key in the token:
	// its label, which is not secret.
	auditKeyFile = "audit-key.ref"
	// auditKeyPrefix labels the audit key in the token; the SVID keys' store ("svid-")
	// neither lists nor destroys it.
	auditKeyPrefix = "audit-"
	// Bounds of the checkpoint settings: a shorter interval only costs signatures, a
	// smaller file only segments.
	minCheckpointInterval = 100 * time.Millisecond
	minMaxFileBytes       = 64 << 10
	// defaultCheckpointInterval is audit.Config's.
	defaultCheckpointInterval = 10 * time.Second
)

// auditVerifierKey is the verifier key of the log's checkpoints: the log names its
// signer by its origin.
func auditVerifierKey(origin string, key crypto.Signer) (string, error) {
	s, err := audit.NewNoteSigner(origin, key)
	if err != nil {
		return "", fmt.Errorf("audit key: %w", err)
	}
	return s.VerifierKey(), nil
}

// openAuditKey returns the key that signs the audit log's checkpoints, which is never
// a TLS key: with keys in a token (uri, as openKeyStore returns it), a key of that
// token under its own label prefix, made at the first start and named in
// STATE/audit-key.ref, then opened again at every start, so the CA, which binds the
// key to this host's log at the first checkpoint, keeps accepting it; with keys in
// memory (uri ""), a key that dies with the process, so a restarted proxy's
// checkpoints are refused until the CA forgets its log (docs/audit.md).
func openAuditKey(ctx context.Context, state, uri string) (crypto.Signer, func(), error) {
	if uri == "" {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		return key, func() {}, err
	}
	keys, err := hsm.OpenKeys(ctx, uri, auditKeyPrefix)
	if err != nil {
		return nil, nil, fmt.Errorf("audit key: %w", err)
	}
	key, err := auditKeyIn(ctx, keys, filepath.Join(state, auditKeyFile))
	if err != nil {
		_ = keys.Close()
		return nil, nil, err
	}
	return key, func() { _ = keys.Close() }, nil
}

// auditKeyIn opens the key refFile names in keys, or makes one and writes its
// reference there when the file does not exist. A reference to a key the token does
// not hold is an error: a new key would not be the one the CA knows.
func auditKeyIn(ctx context.Context, keys *hsm.Keys, refFile string) (crypto.Signer, error) {
	b, err := os.ReadFile(refFile)
	switch {
	case err == nil:
		key, err := keys.Open(ctx, strings.TrimSpace(string(b)))
		if err != nil {
			return nil, fmt.Errorf("audit key named in %s: %w", refFile, err)
		}
		return key, nil
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("audit key: %w", err)
	}
	key, err := keys.NewKey(ctx)
	if err != nil {
		return nil, fmt.Errorf("audit key: %w", err)
	}
	ref, err := keys.Ref(key)
	if err == nil {
		err = atomicfile.Write(refFile, []byte(ref+"\n"), 0o600)
	}
	if err != nil {
		// Not kept: a key no file names would be made again at the next start.
		_ = keys.Destroy(ctx, key)
		return nil, fmt.Errorf("audit key: %w", err)
	}
	return key, nil
}

// auditConfig is the audit log's configuration: the file's settings, signed by key
// under the host's origin, witnessed by the CA through witness.
func (c *Config) auditConfig(key crypto.Signer, witness audit.Witness) audit.Config {
	return audit.Config{Path: c.Audit.Path, MaxFileBytes: c.Audit.MaxFileBytes,
		Origin: meshapi.AuditOrigin(c.id), Signer: key, Witness: witness,
		CheckpointRecords: c.Audit.CheckpointRecords, CheckpointInterval: c.Audit.CheckpointInterval}
}

// witnessFunc adapts a function to audit.Witness.
type witnessFunc func(ctx context.Context, req audit.WitnessRequest) ([]byte, error)

func (f witnessFunc) Witness(ctx context.Context, req audit.WitnessRequest) ([]byte, error) {
	return f(ctx, req)
}

// errNoWitness: the audit log asked for a cosignature before the mesh client was made.
var errNoWitness = errors.New("audit witness: the mesh client is not running yet")

// witness is the audit log's Witness: the CA, through the mesh client that buildMesh
// makes after the log (it needs the host's rotator, which writes to the log).
func (n *node) witness(ctx context.Context, req audit.WitnessRequest) ([]byte, error) {
	if n.auditWitness == nil {
		return nil, errNoWitness
	}
	n.witnessed.Store(time.Now().UnixNano())
	return n.auditWitness.Witness(ctx, req)
}

// witnessIdle keeps the CA hearing from this proxy while its log does not grow, when
// the log sends it nothing (idleCheckIn). The CA so sees the host alive (a host that
// stops sending shows as stale), and this proxy's cosignature of the CA's latest
// checkpoint, which each answer carries, reaches the CA.
func (n *node) witnessIdle(ctx context.Context) error {
	interval := n.cfg.Audit.CheckpointInterval
	if interval <= 0 {
		interval = defaultCheckpointInterval
	}
	c := idleCheckIn{latest: n.audit.Latest, witness: witnessFunc(n.witness), key: n.auditVerifierKey,
		interval: interval, last: &n.witnessed, logger: n.component("audit")}
	return c.run(ctx)
}

// idleCheckIn sends a log's latest checkpoint to its witness again, as an extension of
// itself, every interval in which nothing called the witness. The call changes nothing
// the witness holds: the same checkpoint is cosigned again, or, when the witness holds
// an older one, refused with a conflict that the log's own next round resolves.
type idleCheckIn struct {
	latest   func() ([]byte, audit.Checkpoint) // the log's latest signed checkpoint
	witness  audit.Witness
	key      string // the log's verifier key
	interval time.Duration
	last     *atomic.Int64 // when the witness was last called, Unix ns
	logger   *slog.Logger
}

// run sends until ctx is done; failures are logged and the next interval tries again.
func (c idleCheckIn) run(ctx context.Context) error {
	t := time.NewTicker(c.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if time.Since(time.Unix(0, c.last.Load())) < c.interval {
			continue
		}
		note, cp := c.latest()
		if note == nil {
			continue
		}
		_, err := c.witness.Witness(ctx, audit.WitnessRequest{Checkpoint: note, Key: c.key, OldSize: cp.Size})
		if _, conflict := errors.AsType[*audit.WitnessConflict](err); err != nil && !conflict && ctx.Err() == nil {
			c.logger.WarnContext(ctx, "audit checkpoint not sent again to the witness", "err", err)
		}
	}
}

// validateCheckpoints checks the checkpoint settings of the audit section (0: the
// default).
func validateCheckpoints(records int, interval time.Duration, maxFile int64) error {
	switch {
	case records < 0:
		return fieldError("audit.checkpoint_records", errors.New("must not be negative (0: 1000)"))
	case interval != 0 && interval < minCheckpointInterval:
		return fieldError("audit.checkpoint_interval", fmt.Errorf("must be 0 (10s) or at least %v", minCheckpointInterval))
	case maxFile != 0 && maxFile < minMaxFileBytes:
		return fieldError("audit.max_file_bytes", fmt.Errorf("must be 0 (64 MiB) or at least %d", minMaxFileBytes))
	}
	return nil
}
