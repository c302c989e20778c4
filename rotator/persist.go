package rotator

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/internal/atomicfile"
)

// PersistentKeys is a KeyStore whose keys outlive the process, such as a PKCS#11
// token: each key has a reference, which is not secret, under which a later process
// finds it again. *hsm.Keys satisfies it. Config.StateFile needs one.
type PersistentKeys interface {
	KeyStore
	// Ref returns the reference of key, a key NewKey or Open of this store returned.
	Ref(key crypto.Signer) (string, error)
	// Open returns the key that Ref named, made by this store in this process or an
	// earlier one; it fails when the store holds no such key.
	Open(ctx context.Context, ref string) (crypto.Signer, error)
}

// RestoreResult says what Run found in Config.StateFile when it started.
type RestoreResult string

// Results of the restore at start, as counted by the agentmesh_rotator_restores_total
// metric.
const (
	// RestoreNone: nothing was stored; the identity enrols.
	RestoreNone RestoreResult = "none"
	// RestoreValid: a valid SVID was stored with its key; it is presented at once and
	// renewed (trigger "restart").
	RestoreValid RestoreResult = "restored"
	// RestoreExpired: the stored SVID has expired; it is retired (its key destroyed) and
	// the identity enrols, which needs a bootstrap token the CA has not seen yet.
	RestoreExpired RestoreResult = "expired"
	// RestoreUnusable: the file is unreadable or malformed, its key is gone from the
	// store, or the SVID is not this identity's, does not chain to the bundle or was
	// revoked; the identity enrols.
	RestoreUnusable RestoreResult = "unusable"
)

const (
	// stateFormat is the version of Config.StateFile's format.
	stateFormat = 1
	// maxStateFile bounds what is read of Config.StateFile: a chain is a few KiB.
	maxStateFile = 64 << 10
	// stateFileMode keeps the file private to the proxy's user, like the rest of its
	// state directory, although nothing in it is secret.
	stateFileMode = 0o600
)

// storedSVID is the content of Config.StateFile: the current SVID's public half and
// the reference of its key in the key store, never the key itself.
type storedSVID struct {
	Format   int       `json:"format"`
	SPIFFEID string    `json:"spiffe_id"`
	Serial   string    `json:"serial"`
	NotAfter time.Time `json:"not_after"`
	// Key is the key store's reference of the private key (for a PKCS#11 token, the
	// label of its object).
	Key string `json:"key"`
	// Chain is the certificate chain, leaf first, each certificate DER (base64 in the
	// JSON).
	Chain [][]byte `json:"chain"`
}

// encodeStored returns the state file's content for svid, whose key ref names.
func encodeStored(svid *x509svid.SVID, ref string) ([]byte, error) {
	chain := make([][]byte, len(svid.Certificates))
	for i, c := range svid.Certificates {
		chain[i] = c.Raw
	}
	leaf := svid.Certificates[0]
	return json.MarshalIndent(storedSVID{
		Format: stateFormat, SPIFFEID: svid.ID.String(), Serial: leaf.SerialNumber.String(),
		NotAfter: leaf.NotAfter, Key: ref, Chain: chain,
	}, "", "  ")
}

// decodeStored parses a state file's content for identity id: the key reference and the
// chain, leaf first. It checks the format only; checkStored checks the SVID.
func decodeStored(b []byte, id spiffeid.ID) (string, []*x509.Certificate, error) {
	var st storedSVID
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&st); err != nil {
		return "", nil, fmt.Errorf("malformed: %w", err)
	}
	switch {
	case st.Format != stateFormat:
		return "", nil, fmt.Errorf("format %d, want %d", st.Format, stateFormat)
	case st.SPIFFEID != id.String():
		return "", nil, fmt.Errorf("holds %q, not %s", st.SPIFFEID, id)
	case st.Key == "":
		return "", nil, errors.New("no key reference")
	}
	if len(st.Chain) == 0 {
		return "", nil, errors.New("no certificate")
	}
	certs := make([]*x509.Certificate, len(st.Chain))
	for i, der := range st.Chain {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return "", nil, fmt.Errorf("chain[%d]: %w", i, err)
		}
		certs[i] = c
	}
	if certs[0].SerialNumber.String() != st.Serial {
		return "", nil, fmt.Errorf("serial %s does not match the leaf's %s", st.Serial, certs[0].SerialNumber)
	}
	return st.Key, certs, nil
}

// checkStored turns a stored chain and its key into an SVID for id with the rules
// every answer of the CA passes (checkAnswer), at now, or at the leaf's NotAfter if it
// has expired: an expired SVID is never presented, but it must still be this
// identity's own to be recorded as such.
func checkStored(id spiffeid.ID, key crypto.Signer, certs []*x509.Certificate, bundle x509bundle.Source, now time.Time) (*x509svid.SVID, bool, error) {
	at, gone := now, expired(certs[0].NotAfter, now)
	if gone {
		at = certs[0].NotAfter
	}
	svid, err := checkAnswer(id, key, certs, bundle, at)
	return svid, gone, err
}

// readStateFile reads at most maxStateFile bytes of path.
func readStateFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	b, err := io.ReadAll(io.LimitReader(f, maxStateFile+1))
	if err == nil && len(b) > maxStateFile {
		err = fmt.Errorf("larger than %d bytes", maxStateFile)
	}
	return b, err
}

// restore starts from the SVID stored by an earlier process, if any: a usable one
// (valid, or expired but this identity's) becomes the current credential with its key
// (key state active, cause restored). Called by Run's goroutine before its loop.
func (r *Rotator) restore(ctx context.Context) RestoreResult {
	if r.persist == nil {
		return RestoreNone
	}
	res, err := r.load(ctx)
	r.metrics.restores.WithLabelValues(string(res)).Inc()
	attrs := []slog.Attr{slog.String(keySPIFFEID, r.cfg.ID.String()), slog.String(keyFile, r.cfg.StateFile),
		slog.String(keyResult, string(res))}
	switch res {
	case RestoreNone:
		r.cfg.Logger.LogAttrs(ctx, slog.LevelInfo, "no stored svid: enrolling", attrs...)
	case RestoreUnusable:
		r.cfg.Logger.LogAttrs(ctx, slog.LevelError, "stored svid unusable: enrolling", append(attrs, slog.Any(keyErr, err))...)
	default:
		c := r.state.Load().current
		r.cfg.Logger.LogAttrs(ctx, slog.LevelInfo, "stored svid restored",
			append(attrs, slog.String(keySerial, c.serial), slog.Time(keyNotAfter, c.notAfter()))...)
	}
	return res
}

// load reads, checks and publishes the stored SVID, and says why when it cannot.
func (r *Rotator) load(ctx context.Context) (RestoreResult, error) {
	b, err := readStateFile(r.cfg.StateFile)
	if errors.Is(err, fs.ErrNotExist) {
		return RestoreNone, nil
	}
	if err != nil {
		return RestoreUnusable, fmt.Errorf("rotator: read stored svid: %w", err)
	}
	ref, certs, err := decodeStored(b, r.cfg.ID)
	if err != nil {
		return RestoreUnusable, fmt.Errorf("rotator: stored svid %s: %w", r.cfg.StateFile, err)
	}
	key, err := r.persist.Open(ctx, ref)
	if err != nil {
		return RestoreUnusable, fmt.Errorf("rotator: key of the stored svid: %w", err)
	}
	now := time.Now()
	svid, gone, err := checkStored(r.cfg.ID, key, certs, r.state.Load().bundle, now)
	if err != nil {
		return RestoreUnusable, fmt.Errorf("rotator: stored svid: %w", err)
	}
	r.version++
	c := newCredential(svid, r.version, r.signedWith)
	if err := r.publishRestored(ctx, c, now); err != nil {
		return RestoreUnusable, err
	}
	r.stored = c.serial
	if gone {
		return RestoreExpired, nil
	}
	return RestoreValid, nil
}

// publishRestored makes c, restored from the state file, the current credential. An
// expired one is retired by the loop's first endOverlaps, like any SVID that expired
// while held.
func (r *Rotator) publishRestored(ctx context.Context, c *credential, now time.Time) error {
	r.recordMu.Lock()
	defer r.recordMu.Unlock()
	r.mu.Lock()
	if err := r.refuseRevoked(c, nil); err != nil {
		r.mu.Unlock()
		return err
	}
	s := r.state.Load()
	active := c.to(StateActive, CauseRestored, now)
	next := &snapshot{current: active, bundle: s.bundle}
	leaf := active.svid.Certificates[0]
	next.renewAt = RenewAt(leaf.NotBefore, leaf.NotAfter, *r.policy.Load(), r.cfg.Rand.Float64())
	r.state.Store(next)
	r.metrics.published(next)
	r.mu.Unlock()
	// From no state: the key was made, and went through its states, in another process.
	r.record(ctx, changed(active, ""))
	return nil
}

// syncStore makes the state file hold what the snapshot holds: the current SVID once
// published, nothing once it was dropped (revoked or compromised: a restart must not
// bring it back). It does I/O only when that changed. A failed write is logged and
// retried at the loop's next wake-up. Called by Run's goroutine only.
func (r *Rotator) syncStore(ctx context.Context) {
	if r.persist == nil {
		return
	}
	c := r.state.Load().current
	switch {
	case c == nil && r.stored != "":
		if err := os.Remove(r.cfg.StateFile); err != nil && !errors.Is(err, fs.ErrNotExist) {
			r.storeFailed(ctx, fmt.Errorf("rotator: remove stored svid: %w", err))
			return
		}
		r.stored = ""
	case c != nil && c.serial != r.stored && c.key != nil:
		if err := r.save(c); err != nil {
			r.storeFailed(ctx, err)
			return
		}
		r.stored = c.serial
	}
}

// save writes c to the state file, atomically: a crash leaves the previous SVID or this
// one, never a mix.
func (r *Rotator) save(c *credential) error {
	ref, err := r.persist.Ref(c.key)
	if err != nil {
		return fmt.Errorf("rotator: store svid %s: key reference: %w", c.serial, err)
	}
	b, err := encodeStored(c.svid, ref)
	if err != nil {
		return fmt.Errorf("rotator: store svid %s: %w", c.serial, err)
	}
	if err := atomicfile.Write(r.cfg.StateFile, b, stateFileMode); err != nil {
		return fmt.Errorf("rotator: store svid %s: %w", c.serial, err)
	}
	return nil
}

func (r *Rotator) storeFailed(ctx context.Context, err error) {
	r.metrics.storeFailures.Inc()
	r.cfg.Logger.LogAttrs(ctx, slog.LevelError, "svid not stored: a restart may need a new bootstrap token",
		slog.String(keySPIFFEID, r.cfg.ID.String()), slog.String(keyFile, r.cfg.StateFile), slog.Any(keyErr, err))
}
