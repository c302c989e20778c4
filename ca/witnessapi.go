package ca

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

const (
	// maxCheckpointBody bounds a POSTed checkpoint: two signed notes of at most 16
	// KiB and a proof.
	maxCheckpointBody = 64 << 10
	// maxOriginLen bounds the origin of a GET: a trust domain and a SPIFFE path.
	maxOriginLen = 4096
	// Admin socket paths of the witness.
	adminWitnessPath = "/audit/witness"
	adminForgetPath  = "/audit/forget"
)

// Witness event actions and results.
const (
	witnessActionBind       = "bind"
	witnessActionCheckpoint = "checkpoint"
	witnessActionForget     = "forget"
	witnessResultOK         = "ok"
	witnessResultRefused    = "refused"
	reasonKeyChanged        = "key_changed"
	reasonInconsistent      = "inconsistent"
)

// errOtherOrigin: a checkpoint of another origin than the caller's.
var errOtherOrigin = errors.New("checkpoint origin is not the caller's")

// handleAuditCheckpoint witnesses a host's checkpoint (POST AuditCheckpointPath).
func (s *Server) handleAuditCheckpoint(w http.ResponseWriter, r *http.Request) {
	id := callerID(r)
	if !meshapi.IsHostID(id) {
		s.witnessInvalid(w, r, http.StatusForbidden, "only "+meshapi.HostPathPrefix+"* identities keep witnessed audit logs")
		return
	}
	origin := meshapi.AuditOrigin(id)
	var body meshapi.CheckpointRequest
	if err := meshapi.DecodeStrict(http.MaxBytesReader(w, r.Body, maxCheckpointBody), &body); err != nil {
		s.witnessInvalid(w, r, http.StatusBadRequest, "invalid request body: "+err.Error())
		return
	}
	req, err := parseCheckpointRequest(body, origin)
	switch {
	case errors.Is(err, errOtherOrigin):
		s.witnessInvalid(w, r, http.StatusForbidden, err.Error())
		return
	case err != nil:
		s.witnessInvalid(w, r, http.StatusBadRequest, err.Error())
		return
	}

	slot := s.witness.lock(origin)
	defer slot.mu.Unlock()
	held := slot.rec.Load()
	now := time.Now()
	next, result, err := decideCheckpoint(held, id.String(), req, s.auditSigner, now)
	ev := audit.WitnessEvent{Actor: audit.TLSActor(r.TLS), Action: witnessActionCheckpoint,
		Origin: origin, Key: req.writer.Key(), Size: req.c.Size, Hash: hashString(req.c.Hash),
		HeldSize: held.latest().Size, HeldHash: held.latest().Hash}
	var conflict *audit.WitnessConflict
	switch {
	case result == checkpointAccepted:
		s.acceptCheckpoint(w, r, slot, held, next, req, body)
		return
	case errors.As(err, &conflict):
		s.wm.checkpoints.WithLabelValues(string(checkpointConflict)).Inc()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusConflict)
		_ = json.NewEncoder(w).Encode(meshapi.CheckpointConflict{Size: conflict.Size, Cosigned: string(conflict.Cosigned)})
		return
	case result == checkpointInconsistent:
		s.refuseInconsistent(w, r, slot, held, req, ev, err, now)
		return
	case errors.Is(err, errKeyChanged):
		ev.Result, ev.Reason, ev.Error = witnessResultRefused, reasonKeyChanged, err.Error()
		s.audit(ev)
		s.witnessInvalid(w, r, http.StatusForbidden, err.Error())
		return
	default:
		s.witnessInvalid(w, r, http.StatusBadRequest, err.Error())
	}
}

// acceptCheckpoint persists next (the checkpoint accepted, and the CA checkpoint the
// host cosigned when it sent one), then answers it cosigned with the CA's own latest
// checkpoint. Called with slot locked.
func (s *Server) acceptCheckpoint(w http.ResponseWriter, r *http.Request, slot *witnessSlot, held, next *witnessRecord,
	req checkpointRequest, body meshapi.CheckpointRequest,
) {
	now := next.LastSeen
	if body.CACosigned != "" {
		var err error
		if next, err = withCACosigned(next, body.CACosigned, req.writer, s.auditSigner.verifier, s.caOrigin, now); err != nil {
			// The host's own checkpoint stands; its cosignature of the CA's is not kept.
			s.log.Warn("ca checkpoint cosigned by a host refused", keySPIFFEID, next.Host, keyErr, err)
		}
	}
	if err := s.witness.persist(next); err != nil {
		s.log.Error("witness record not persisted", keyOrigin, next.Origin, keyErr, err)
		writeStepError(w, http.StatusServiceUnavailable, "checkpoint not recorded")
		return
	}
	slot.rec.Store(next)
	s.wm.checkpoints.WithLabelValues(string(checkpointAccepted)).Inc()
	if held == nil {
		s.audit(audit.WitnessEvent{Actor: audit.TLSActor(r.TLS), Action: witnessActionBind,
			Origin: next.Origin, Result: witnessResultOK, Key: next.Key, Size: next.latest().Size, Hash: next.latest().Hash})
		s.log.Info("audit log witnessed from its first checkpoint", keyOrigin, next.Origin, keySPIFFEID, next.Host)
	}
	caMsg, caProof := s.caCheckpoint(body.CASize)
	writeJSON(w, meshapi.CheckpointResponse{Cosigned: next.Cosigned, WitnessKey: s.auditSigner.verifier.Key(),
		CACheckpoint: caMsg, CAProof: caProof})
}

// refuseInconsistent records a checkpoint that does not extend the one held: the held
// one stays, the log's state turns inconsistent, the refusal is audited, counted and
// answered 403 with CodeAuditInconsistent. Called with slot locked.
func (s *Server) refuseInconsistent(w http.ResponseWriter, r *http.Request, slot *witnessSlot, held *witnessRecord,
	req checkpointRequest, ev audit.WitnessEvent, reason error, now time.Time,
) {
	next := held.inconsistent(req, reason, now)
	if err := s.witness.persist(next); err != nil {
		// Kept in memory: the state shows until a restart, the audit record for good.
		s.log.Error("witness record not persisted", keyOrigin, next.Origin, keyErr, err)
	}
	slot.rec.Store(next)
	s.wm.checkpoints.WithLabelValues(string(checkpointInconsistent)).Inc()
	ev.Result, ev.Reason, ev.Error = witnessResultRefused, reasonInconsistent, reason.Error()
	s.audit(ev)
	s.log.Warn("audit checkpoint refused: inconsistent with the one witnessed", keyOrigin, next.Origin,
		keySPIFFEID, callerID(r).String(), keySize, req.c.Size, keyHeldSize, held.latest().Size, keyErr, reason)
	writeCodedError(w, http.StatusForbidden, meshapi.CodeAuditInconsistent, reason.Error())
}

// witnessInvalid refuses a checkpoint request that is malformed, badly signed, of
// another origin or key, and counts it.
func (s *Server) witnessInvalid(w http.ResponseWriter, r *http.Request, status int, msg string) {
	s.wm.checkpoints.WithLabelValues(string(checkpointInvalid)).Inc()
	s.refuse(w, r, status, callerID(r), msg)
}

// writeCodedError answers in step-ca's error format with a code a client can branch on.
func writeCodedError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(struct {
		Status  int    `json:"status"`
		Message string `json:"message"`
		Code    string `json:"code"`
	}{status, msg, code})
}

// handleWitnessedLog answers what the witness holds of one log (GET WitnessPrefix +
// WitnessCheckpointsPath?origin=O): public, everything in it is signed.
func (s *Server) handleWitnessedLog(w http.ResponseWriter, r *http.Request) {
	origin := r.URL.Query().Get("origin")
	if origin == "" || len(origin) > maxOriginLen {
		writeStepError(w, http.StatusBadRequest, "query parameter origin is required")
		return
	}
	wl, ok := s.witnessedLog(origin, time.Now())
	if !ok {
		writeStepError(w, http.StatusNotFound, "no witnessed checkpoint of origin "+origin)
		return
	}
	writeJSON(w, wl)
}

// witnessedLog is what the witness holds of origin at now.
func (s *Server) witnessedLog(origin string, now time.Time) (meshapi.WitnessedLog, bool) {
	if origin == s.caOrigin {
		return caWitnessed(s.witness.records(), s.auditSigner.verifier, origin, now, s.cfg.WitnessStaleAfter)
	}
	slot, ok := s.witness.slots()[origin]
	if !ok || slot.rec.Load() == nil {
		return meshapi.WitnessedLog{}, false
	}
	return s.hostWitnessed(slot.rec.Load(), now), true
}

// hostWitnessed is a host's record as a WitnessedLog: History without the latest.
func (s *Server) hostWitnessed(rec *witnessRecord, now time.Time) meshapi.WitnessedLog {
	earlier := rec.History[:max(len(rec.History), 1)-1]
	return meshapi.WitnessedLog{Origin: rec.Origin, Key: rec.Key, WitnessKeys: []string{s.auditSigner.verifier.Key()},
		Latest: rec.Cosigned, History: earlier[:len(earlier):len(earlier)],
		LastSeen: rec.LastSeen, State: string(rec.state(now, s.cfg.WitnessStaleAfter))}
}

// witnessStatus lists every witnessed log, the CA's own first, then by origin,
// without their histories.
func (s *Server) witnessStatus(now time.Time) []meshapi.WitnessedLog {
	out := []meshapi.WitnessedLog{} // a JSON list, never null
	for _, rec := range s.witness.records() {
		wl := s.hostWitnessed(rec, now)
		wl.History = nil
		out = append(out, wl)
	}
	slices.SortFunc(out, func(a, b meshapi.WitnessedLog) int { return strings.Compare(a.Origin, b.Origin) })
	if own, ok := caWitnessed(s.witness.records(), s.auditSigner.verifier, s.caOrigin, now, s.cfg.WitnessStaleAfter); ok {
		own.History = nil
		out = append([]meshapi.WitnessedLog{own}, out...)
	}
	return out
}

func (s *Server) handleAdminWitness(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, s.witnessStatus(time.Now()))
}

// ForgetRequest is the body of the admin socket's forget of a witnessed log.
type ForgetRequest struct {
	Origin string `json:"origin"`
	Reason string `json:"reason,omitempty"`
}

// handleAdminForget forgets a witnessed log so that its host may start a new one (a
// replaced disk): its key, checkpoints and state go; audited.
func (s *Server) handleAdminForget(w http.ResponseWriter, r *http.Request) {
	ev := audit.WitnessEvent{Actor: adminActor(r), Action: witnessActionForget, Result: witnessResultRefused}
	var req ForgetRequest
	if err := meshapi.DecodeStrict(http.MaxBytesReader(w, r.Body, adminMaxBody), &req); err != nil {
		ev.Error = "invalid request body: " + err.Error()
		s.audit(ev)
		writeAdminError(w, http.StatusBadRequest, ev.Error)
		return
	}
	ev.Origin = req.Origin
	var (
		rec    *witnessRecord
		err    error
		status int
	)
	if req.Origin == s.caOrigin {
		err = fmt.Errorf("%s is the ca's own log: the proxies witness it", req.Origin)
	} else {
		rec, err = s.witness.remove(req.Origin)
	}
	switch {
	case req.Origin == s.caOrigin:
		status = http.StatusBadRequest
	case err != nil:
		status, ev.Result = http.StatusInternalServerError, "error"
	case rec == nil:
		status, err = http.StatusNotFound, fmt.Errorf("no witnessed log of origin %q", req.Origin)
	}
	if err != nil {
		ev.Error = err.Error()
		s.audit(ev)
		writeAdminError(w, status, ev.Error)
		return
	}
	ev.Result, ev.Reason, ev.Key, ev.HeldSize, ev.HeldHash = witnessResultOK, req.Reason, rec.Key, rec.latest().Size, rec.latest().Hash
	s.audit(ev)
	s.log.LogAttrs(r.Context(), slog.LevelWarn, "witnessed audit log forgotten", slog.String(keyOrigin, req.Origin),
		slog.String(keyInitiator, ev.Initiator), slog.String(keyReason, req.Reason))
	writeJSON(w, s.hostWitnessed(rec, time.Now()))
}

// WitnessStatus lists the audit logs the CA running with state directory stateDir
// witnesses (its own first) with their state, through its admin socket (what
// `agentmesh status --state` shows). A refusal is a *meshapi.ResponseError.
func WitnessStatus(ctx context.Context, stateDir string) ([]meshapi.WitnessedLog, error) {
	return adminJSON[[]meshapi.WitnessedLog](ctx, stateDir, "audit witness", http.MethodGet, adminWitnessPath, nil)
}

// ForgetAuditLog has the CA running with state directory stateDir forget the audit
// log of req.Origin, so that its host may start a new one under it (`agentmesh ca
// audit forget`): it returns what the CA held. Audited. A refusal is a
// *meshapi.ResponseError (404: no such log).
func ForgetAuditLog(ctx context.Context, stateDir string, req ForgetRequest) (*meshapi.WitnessedLog, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("ca: audit forget: %w", err)
	}
	wl, err := adminJSON[meshapi.WitnessedLog](ctx, stateDir, "audit forget", http.MethodPost, adminForgetPath, body)
	if err != nil {
		return nil, err
	}
	return &wl, nil
}

// adminJSON sends one request to the admin socket of stateDir and decodes its answer.
func adminJSON[T any](ctx context.Context, stateDir, op, method, path string, body []byte) (T, error) {
	var out T
	b, err := adminRequest(ctx, stateDir, op, method, path, body, meshapi.MaxResponse)
	if err != nil {
		return out, err
	}
	if err := json.Unmarshal(b, &out); err != nil {
		return out, fmt.Errorf("ca: %s: malformed answer from the admin socket: %w", op, err)
	}
	return out, nil
}
