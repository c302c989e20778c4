package node

import (
	"bytes"
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"sync"

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

// caLog witnesses the CA's log. Its methods are called by the audit log's witness
// calls, one at a time; mu guards against any other.
type caLog struct {
	path   string
	origin string // meshapi.CAAuditOrigin of the trust domain
	key    crypto.Signer
	audit  rotator.Auditor
	refuse prometheus.Gauge
	logger *slog.Logger

	mu   sync.Mutex
	st   caAuditState
	last *audit.Checkpoint // of st.Cosigned
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
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return l, nil
	}
	if err == nil {
		err = json.Unmarshal(b, &l.st)
	}
	if err == nil && l.st.Cosigned != "" {
		var v *audit.NoteVerifier
		if v, err = audit.ParseVerifierKey(l.st.WitnessKey); err == nil {
			var c audit.Checkpoint
			_, c, err = audit.OpenCheckpoint([]byte(l.st.Cosigned), v)
			l.last = &c
		}
	}
	if err != nil {
		return nil, fmt.Errorf("ca audit state %s: %w", path, err)
	}
	if l.st.Refused != "" {
		l.refuse.Set(1)
	}
	return l, nil
}

// Cosigned returns the last CA checkpoint cosigned and its size; none once a CA
// checkpoint was refused, while the CA is still asked to prove its log from that size.
func (l *caLog) Cosigned() ([]byte, uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var size uint64
	if l.last != nil {
		size = l.last.Size
	}
	if l.st.Refused != "" || l.st.Cosigned == "" {
		return nil, size
	}
	return []byte(l.st.Cosigned), size
}

// observe checks cp against the pinned key and the last checkpoint cosigned, cosigns it
// and keeps it. A refusal is recorded (audit record, metric, Error log) and sticks; a
// malformed checkpoint is logged and ignored.
func (l *caLog) observe(ctx context.Context, cp caCheckpoint) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.st.Refused != "" {
		return
	}
	next, c, err := l.cosign(cp)
	var refused string
	switch {
	case errors.Is(err, errKeyChanged):
		refused = caRefusedKey
	case errors.Is(err, audit.ErrInconsistent):
		refused = caRefusedInconsistent
	case err != nil:
		l.logger.Warn("ca checkpoint not cosigned", "err", err)
		return
	}
	if refused != "" {
		l.refused(ctx, refused, cp, err)
		return
	}
	if err := l.save(next); err != nil {
		// The last one kept is sent again, and the CA proves from its size again.
		l.logger.Warn("ca checkpoint cosigned but not kept", "err", err)
		return
	}
	l.st, l.last = next, &c
}

// errKeyChanged: the CA's witness key is not the one pinned.
var errKeyChanged = errors.New("the ca's audit key is not the one pinned at first sight")

// cosign returns the state with cp cosigned and its checkpoint, or why cp is refused.
func (l *caLog) cosign(cp caCheckpoint) (caAuditState, audit.Checkpoint, error) {
	next := l.st
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
	cosigned, c, err := audit.Cosign(cp.note, ca, l.last, cp.proof, signer)
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

// refused records a refused CA checkpoint and keeps the refusal.
func (l *caLog) refused(ctx context.Context, reason string, cp caCheckpoint, cause error) {
	rec := CAAuditRefusal{Origin: l.origin, Reason: reason, Error: cause.Error()}
	if l.last != nil {
		rec.HeldSize = l.last.Size
	}
	if c, err := unverifiedCheckpoint(cp.note); err == nil {
		rec.Size = c.Size
	}
	l.refuse.Set(1)
	l.logger.Error("ca audit log refused: this proxy cosigns none of its checkpoints any more", "reason", reason, "err", cause)
	if err := l.audit.Append(rec); err != nil {
		l.logger.Error("ca audit refusal not recorded", "err", err)
	}
	st := l.st
	st.Refused = reason
	if err := l.save(st); err != nil {
		l.logger.Error("ca audit refusal not kept", "err", err)
	}
	l.st = st
}

// unverifiedCheckpoint parses the body of a signed checkpoint without checking any
// signature: for the record of one refused.
func unverifiedCheckpoint(msg []byte) (audit.Checkpoint, error) {
	i := bytes.LastIndex(msg, []byte("\n\n"))
	if i < 0 {
		return audit.Checkpoint{}, audit.ErrCheckpoint
	}
	return audit.ParseCheckpoint(string(msg[:i+1]))
}
