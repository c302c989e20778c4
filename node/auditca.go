package node

import (
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/mod/sumdb/tlog"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/atomicfile"
	"github.com/agentmesh/agentmesh/rotator"
)

// This file is the proxy's half of witnessing the CA's own audit log, so that the CA is
// not its own witness: every answer to this proxy's checkpoint carries the CA's latest
// checkpoint with a consistency proof from the last one this proxy cosigned; the proxy
// checks it, cosigns it with its audit key, and sends the cosignature with its next
// checkpoint. The CA's key is pinned at first sight.

const (
	// caAuditFile, in the state directory, is caAuditState.
	caAuditFile = "ca-audit.json"
	// metricCAAuditInconsistent is 1 once the CA showed this proxy a log that does not
	// extend the one it cosigned (or signed by another key): it cosigns no more.
	metricCAAuditInconsistent = "agentmesh_proxy_ca_audit_inconsistent"
)

// Why a CA checkpoint is refused (CAAuditRefusal.Reason).
const (
	caRefusedInconsistent = "inconsistent" // not an extension of the one cosigned before
	caRefusedKey          = "key_changed"  // signed by another key than the pinned one
)

// caAuditState is STATE/ca-audit.json.
type caAuditState struct {
	// WitnessKey is the CA's verifier key, pinned at the first answer.
	WitnessKey string `json:"witness_key"`
	// Cosigned is the last CA checkpoint this proxy cosigned, with the cosignature.
	Cosigned string `json:"cosigned,omitempty"`
	// Refused is set once a CA checkpoint was refused (a CAAuditRefusal reason): no
	// further CA checkpoint is cosigned until an operator, having found out why, removes
	// the file.
	Refused string `json:"refused,omitempty"`
}

// CAAuditRefusal records a CA checkpoint this proxy refused to cosign: the CA's log
// was rewritten, cut or forked since the checkpoint this proxy cosigned before, or the
// CA signs with another key than the one pinned.
type CAAuditRefusal struct {
	Origin   string `json:"origin"`
	Reason   string `json:"reason"` // "inconsistent" | "key_changed"
	Size     uint64 `json:"size"`   // of the CA checkpoint refused
	HeldSize uint64 `json:"held_size"`
	Error    string `json:"error"`
}

// Kind returns "ca_audit_refused".
func (CAAuditRefusal) Kind() string { return "ca_audit_refused" }

// caCheckpoint is the CA's checkpoint of its own log, as an answer to this proxy's
// checkpoint carries it.
type caCheckpoint struct {
	witnessKey string
	note       []byte
	proof      tlog.TreeProof // from the size caLog.Cosigned gave
	hostKey    string         // this proxy's audit verifier key: the cosignature's name
}

// caLog witnesses the CA's log. Its methods are called by witness calls, which may
// overlap (the log's rounds, witnessIdle).
type caLog struct {
	path   string
	origin string // meshapi.CAAuditOrigin of the trust domain
	key    crypto.Signer
	audit  rotator.Auditor
	refuse prometheus.Gauge
	logger *slog.Logger

	cur atomic.Pointer[caLogState]
	// write serialises observe, which replaces the state file, then cur; Cosigned reads
	// cur and never waits.
	write sync.Mutex
}

// caLogState is what caLog holds: the state file's content and its checkpoint,
// immutable once published.
type caLogState struct {
	file caAuditState
	last *audit.Checkpoint // of file.Cosigned; nil: none
}

// newCALog loads path (missing: nothing pinned yet). A file that does not parse, or
// whose checkpoint its pinned key did not sign, is an error naming it: the proxy does
// not start rather than forget what it witnessed.
func newCALog(path, origin string, key crypto.Signer, a rotator.Auditor, reg prometheus.Registerer, logger *slog.Logger) (*caLog, error) {
	l := &caLog{path: path, origin: origin, key: key, audit: a, logger: logger,
		refuse: prometheus.NewGauge(prometheus.GaugeOpts{Name: metricCAAuditInconsistent,
			Help: "1 once the CA's audit log was found inconsistent with the checkpoint this proxy cosigned, or signed by another key."})}
	if reg != nil {
		reg.MustRegister(l.refuse)
	}
	st := &caLogState{}
	b, err := os.ReadFile(path)
	if err == nil {
		st.last, err = loadCAAuditState(b, &st.file)
	} else if errors.Is(err, fs.ErrNotExist) {
		err = nil
	}
	if err != nil {
		return nil, fmt.Errorf("ca audit state %s: %w", path, err)
	}
	if st.file.Refused != "" {
		l.refuse.Set(1)
	}
	l.cur.Store(st)
	return l, nil
}

// loadCAAuditState decodes b into st and returns the checkpoint st holds (nil: none):
// the pinned key must parse and have signed it.
func loadCAAuditState(b []byte, st *caAuditState) (*audit.Checkpoint, error) {
	if err := json.Unmarshal(b, st); err != nil {
		return nil, err
	}
	if st.WitnessKey == "" {
		if st.Cosigned != "" {
			return nil, errors.New("a cosigned checkpoint without the key pinned")
		}
		return nil, nil
	}
	v, err := audit.ParseVerifierKey(st.WitnessKey)
	if err != nil || st.Cosigned == "" {
		return nil, err
	}
	_, c, err := audit.OpenCheckpoint([]byte(st.Cosigned), v)
	if err != nil {
		return nil, err
	}
	return &c, nil
}

// Cosigned returns the last CA checkpoint cosigned and its size; none once a CA
// checkpoint was refused, while the CA is still asked to prove its log from that size.
func (l *caLog) Cosigned() ([]byte, uint64) {
	cur := l.cur.Load()
	var size uint64
	if cur.last != nil {
		size = cur.last.Size
	}
	if cur.file.Refused != "" || cur.file.Cosigned == "" {
		return nil, size
	}
	return []byte(cur.file.Cosigned), size
}

// observe checks cp against the pinned key and the last checkpoint cosigned, cosigns it
// and keeps it. A refusal is recorded (audit record, metric, Error log) and sticks; a
// malformed checkpoint is logged and ignored.
func (l *caLog) observe(ctx context.Context, cp caCheckpoint) {
	l.write.Lock()
	defer l.write.Unlock()
	cur := l.cur.Load()
	if cur.file.Refused != "" {
		return
	}
	next, c, err := l.cosign(cur, cp)
	switch {
	case errors.Is(err, errKeyChanged):
		l.refused(ctx, cur, caRefusedKey, cp, err)
	case errors.Is(err, audit.ErrInconsistent):
		l.refused(ctx, cur, caRefusedInconsistent, cp, err)
	case err != nil:
		l.logger.WarnContext(ctx, "ca checkpoint not cosigned", "err", err)
	default:
		if err := l.save(next); err != nil {
			// The last one kept is sent again, and the CA proves from its size again.
			l.logger.WarnContext(ctx, "ca checkpoint cosigned but not kept", "err", err)
			return
		}
		l.cur.Store(&caLogState{file: next, last: &c})
	}
}

// errKeyChanged: the CA's witness key is not the one pinned.
var errKeyChanged = errors.New("the ca's audit key is not the one pinned at first sight")

// cosign returns the state with cp cosigned and its checkpoint, or why cp is refused.
func (l *caLog) cosign(cur *caLogState, cp caCheckpoint) (caAuditState, audit.Checkpoint, error) {
	next := cur.file
	if next.WitnessKey == "" {
		next.WitnessKey = cp.witnessKey
	} else if next.WitnessKey != cp.witnessKey {
		return next, audit.Checkpoint{}, errKeyChanged
	}
	ca, err := audit.ParseVerifierKey(next.WitnessKey)
	if err != nil {
		return next, audit.Checkpoint{}, fmt.Errorf("ca witness key: %w", err)
	}
	// The cosignature is under the name of this proxy's own checkpoints' key, which
	// the CA bound to this host.
	host, err := audit.ParseVerifierKey(cp.hostKey)
	if err != nil {
		return next, audit.Checkpoint{}, err
	}
	signer, err := audit.NewNoteSigner(host.Name(), l.key)
	if err != nil {
		return next, audit.Checkpoint{}, err
	}
	// Another origin is a malformed answer, not the CA's log changing.
	if _, c, err := audit.OpenCheckpoint(cp.note, ca); err != nil {
		return next, c, err
	} else if c.Origin != l.origin {
		return next, c, fmt.Errorf("%w: origin %q, not %q", audit.ErrCheckpoint, c.Origin, l.origin)
	}
	cosigned, c, err := audit.Cosign(cp.note, ca, cur.last, cp.proof, signer)
	if err != nil {
		return next, c, err
	}
	next.Cosigned = string(cosigned)
	return next, c, nil
}

// save writes st to the state file.
func (l *caLog) save(st caAuditState) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	return atomicfile.Write(l.path, b, 0o600)
}

// refused records a refused CA checkpoint and keeps the refusal. Called holding write.
func (l *caLog) refused(ctx context.Context, cur *caLogState, reason string, cp caCheckpoint, cause error) {
	rec := CAAuditRefusal{Origin: l.origin, Reason: reason, Error: cause.Error()}
	if cur.last != nil {
		rec.HeldSize = cur.last.Size
	}
	if c, err := audit.UnverifiedCheckpoint(cp.note); err == nil {
		rec.Size = c.Size
	}
	l.refuse.Set(1)
	l.logger.ErrorContext(ctx, "ca audit log refused: this proxy cosigns none of its checkpoints any more", "reason", reason, "err", cause)
	if err := l.audit.Append(rec); err != nil {
		l.logger.ErrorContext(ctx, "ca audit refusal not recorded", "err", err)
	}
	next := *cur
	next.file.Refused = reason
	if err := l.save(next.file); err != nil {
		l.logger.ErrorContext(ctx, "ca audit refusal not kept", "err", err)
	}
	l.cur.Store(&next)
}
