package ca

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/agentmesh/agentmesh/meshapi"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/atomicfile"
)

// A fleet rotation is an operator's request that every proxy renew its SVID now, with
// a new key (`agentmesh rotate --all`). The CA does not rotate anything itself: it
// records the request, publishes it in the directory document, and each proxy's
// meshclient.Watch publishes it in its mesh state, which the proxy applies.

// fleetRequest is the body of the admin socket's POST /rotate.
type fleetRequest struct {
	Reason string `json:"reason,omitempty"`
}

// Audit vocabulary of a fleet rotation request (audit.Rotation).
const (
	fleetTrigger  = "fleet"
	fleetSPIFFEID = "*" // every proxy
)

// nextFleetID is the ID of a fleet rotation requested at now after the one with ID
// prev (0: none yet): the clock in microseconds, or prev+1 when the clock is not past
// prev (set back, or two requests within a microsecond). Pure.
func nextFleetID(prev uint64, now time.Time) uint64 {
	return max(uint64(max(now.UnixMicro(), 1)), prev+1)
}

// RotateFleet asks every proxy of the mesh to rotate its credential now: it records a
// new FleetRotation (StateDir/fleet-rotation.json, written atomically before anything
// is published, so a restart never reissues an ID), publishes it in the directory
// document, whose version moves so that every long-poll wakes at once, and audits it
// (audit.Rotation: trigger "fleet", SPIFFE ID "*", actor as given, "uid:N" from
// the admin socket). reason is optional free text, at most 256 printable ASCII
// characters (else ErrInvalidRequest). Concurrent calls are serialised; each gets its
// own ID. Before Run, the rotation is published when Run starts serving. It fails
// with ErrServerClosed after Close.
func (s *Server) RotateFleet(ctx context.Context, actor audit.Actor, reason string) (*meshapi.FleetRotation, error) {
	started := time.Now()
	fr, err := s.rotateFleet(reason, started)
	rec := audit.Rotation{SPIFFEID: fleetSPIFFEID, Trigger: fleetTrigger, Actor: actor, Reason: reason,
		Result: "ok", Started: started, Finished: time.Now()}
	attrs := []slog.Attr{slog.String(keyInitiator, actor.Initiator), slog.String(keyReason, reason)}
	switch {
	case err == nil:
		s.log.LogAttrs(ctx, slog.LevelInfo, "fleet rotation requested", append(attrs, slog.Uint64(keyFleetID, fr.ID))...)
	case errors.Is(err, ErrInvalidRequest):
		// Nothing happened: logged, not audited as a rotation.
		s.log.LogAttrs(ctx, slog.LevelInfo, "fleet rotation refused", append(attrs, slog.String(keyErr, err.Error()))...)
		return nil, err
	default:
		rec.Result = "error"
		s.log.LogAttrs(ctx, slog.LevelError, "fleet rotation failed", append(attrs, slog.String(keyErr, err.Error()))...)
	}
	s.audit(rec)
	return fr, err
}

func (s *Server) rotateFleet(reason string, now time.Time) (*meshapi.FleetRotation, error) {
	if !meshapi.ValidReason(reason) {
		return nil, fmt.Errorf("%w: reason: at most %d printable ASCII characters", ErrInvalidRequest, meshapi.MaxReason)
	}
	s.mu.Lock()
	state := s.state
	s.mu.Unlock()
	if state == stateClosed {
		return nil, ErrServerClosed
	}
	// Held across the file write: each request builds on the ID the previous one
	// persisted, and nothing on a hot path takes it.
	s.fleet.mu.Lock()
	defer s.fleet.mu.Unlock()
	var prev uint64
	if s.fleet.latest != nil {
		prev = s.fleet.latest.ID
	}
	fr := &meshapi.FleetRotation{ID: nextFleetID(prev, now), At: now.UTC().Round(0), Reason: reason}
	b, err := json.Marshal(fr)
	if err != nil {
		return nil, fmt.Errorf("ca: fleet rotation: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(s.cfg.StateDir, fileFleetRotation), b, 0o644); err != nil {
		return nil, fmt.Errorf("ca: fleet rotation: %w", err)
	}
	s.fleet.latest = fr
	s.dir.setFleetRotation(fr)
	return fr, nil
}

// loadFleetRotation reads the persisted latest fleet rotation, if any, and publishes
// it again: proxies that saw it do not act on it twice, and later ones ignore it (At
// is before their start), so serving it costs nothing and keeps the next ID above it.
// A file that does not parse stops New, as a corrupt deny-list does: it is written
// atomically, so it was tampered with.
func (s *Server) loadFleetRotation() error {
	path := filepath.Join(s.cfg.StateDir, fileFleetRotation)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read fleet rotation: %w", err)
	}
	fr, err := parseFleetRotationFile(path, b)
	if err != nil {
		return err
	}
	s.fleet.latest = fr
	s.dir.setFleetRotation(fr)
	return nil
}

// parseFleetRotationFile decodes b, the content of the fleet rotation file at path:
// strict JSON, an ID, a time and a valid reason. Its errors name path.
func parseFleetRotationFile(path string, b []byte) (*meshapi.FleetRotation, error) {
	var fr meshapi.FleetRotation
	if err := meshapi.DecodeStrict(bytes.NewReader(b), &fr); err != nil {
		return nil, fmt.Errorf("fleet rotation %s: %w", path, err)
	}
	if fr.ID == 0 || fr.At.IsZero() || !meshapi.ValidReason(fr.Reason) {
		return nil, fmt.Errorf("fleet rotation %s: malformed", path)
	}
	return &fr, nil
}

// handleAdminRotate is the admin socket's POST /rotate (adminOnly has admitted the
// caller).
func (s *Server) handleAdminRotate(w http.ResponseWriter, r *http.Request) {
	var req fleetRequest
	if err := meshapi.DecodeStrict(http.MaxBytesReader(w, r.Body, adminMaxBody), &req); err != nil {
		writeAdminError(w, http.StatusBadRequest, "invalid request body: "+err.Error())
		return
	}
	// The request completes even if the caller goes away meanwhile.
	fr, err := s.RotateFleet(context.WithoutCancel(r.Context()), adminActor(r), req.Reason)
	switch {
	case errors.Is(err, ErrInvalidRequest):
		writeAdminError(w, http.StatusBadRequest, err.Error())
		return
	case errors.Is(err, ErrServerClosed):
		writeAdminError(w, http.StatusServiceUnavailable, err.Error())
		return
	case err != nil:
		writeAdminError(w, http.StatusInternalServerError, err.Error()) // logged and audited
		return
	}
	writeJSON(w, fr)
}

// RequestFleetRotation asks the CA running with state directory stateDir, through its
// admin socket, to have every proxy rotate its credential now (what `agentmesh rotate
// --all --reason R` runs on the CA host); see Server.RotateFleet. The caller must be
// root or the CA's user. A refusal is a *ResponseError with Op "rotate": 400 for a bad
// reason, 403 for a caller not allowed.
func RequestFleetRotation(ctx context.Context, stateDir, reason string) (*meshapi.FleetRotation, error) {
	body, err := json.Marshal(fleetRequest{Reason: reason})
	if err != nil {
		return nil, fmt.Errorf("ca: rotate: %w", err)
	}
	b, err := adminRequest(ctx, stateDir, "rotate", http.MethodPost, adminRotatePath, body, adminMaxBody)
	if err != nil {
		return nil, err
	}
	var fr meshapi.FleetRotation
	if err := json.Unmarshal(b, &fr); err != nil || fr.ID == 0 {
		return nil, errors.New("ca: rotate: malformed answer from the admin socket")
	}
	return &fr, nil
}
