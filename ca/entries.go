package ca

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/agentmesh/agentmesh/meshapi"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/atomicfile"
)

// A registration entry says which proxy may hold an agent's identity and for which
// local processes: the proxy of Host obtains the agent's SVIDs (POST
// /mesh/v1/agents/token, Directory.AgentToken) and presents them for connections of
// processes running as UID on its host. Entries are changed by operators on the admin
// socket, persisted in StateDir/entries.json and published in the directory document.

// agentPathPrefix is the path prefix of agent identities. Their SVIDs are renewed only
// while a registration entry names them.
const agentPathPrefix = "/agent/"

// Audit vocabulary of registration entries (audit.Registration.Action).
const (
	actionRegister   = "register"
	actionUnregister = "unregister"
)

// entriesFile is the format of StateDir/entries.json.
type entriesFile struct {
	Entries []meshapi.Entry `json:"entries"`
}

// isAgentID reports whether id is under /agent/ (of any depth: only one-segment ones
// can be registered, so deeper ones are never renewed).
func isAgentID(id spiffeid.ID) bool {
	return strings.HasPrefix(id.Path(), agentPathPrefix)
}

// oneSegment reports whether path is prefix followed by exactly one segment. The
// segment's characters were validated when the ID was parsed.
func oneSegment(path, prefix string) bool {
	rest, ok := strings.CutPrefix(path, prefix)
	return ok && rest != "" && !strings.Contains(rest, "/")
}

// checkRegistration validates e for trust domain td: ID is td's /agent/NAME, Host td's
// /host/H (one segment each). Errors wrap ErrInvalidRequest.
func checkRegistration(td spiffeid.TrustDomain, e meshapi.Entry) error {
	switch {
	case e.ID.IsZero():
		return fmt.Errorf("%w: id is required", ErrInvalidRequest)
	case !e.ID.MemberOf(td) || !oneSegment(e.ID.Path(), agentPathPrefix):
		return fmt.Errorf("%w: id %s is not spiffe://%s%sNAME", ErrInvalidRequest, e.ID, td.Name(), agentPathPrefix)
	case e.Host.IsZero():
		return fmt.Errorf("%w: host is required", ErrInvalidRequest)
	case !e.Host.MemberOf(td) || !oneSegment(e.Host.Path(), meshapi.HostPathPrefix):
		return fmt.Errorf("%w: host %s is not spiffe://%s%sNAME", ErrInvalidRequest, e.Host, td.Name(), meshapi.HostPathPrefix)
	}
	return nil
}

type hostUID struct {
	host spiffeid.ID
	uid  uint32
}

type hostPort struct {
	host spiffeid.ID
	port uint16
}

// entrySet is the registration entries in force, indexed for the conflict rules.
// Immutable: changes build a new set. Pure: no clock, no lock, no I/O.
type entrySet struct {
	sorted []meshapi.Entry // by ID
	byID   map[spiffeid.ID]meshapi.Entry
	byUID  map[hostUID]spiffeid.ID
	byPort map[hostPort]spiffeid.ID // Port != 0 only
}

// newEntrySet indexes entries, refusing the first that conflicts with an earlier one
// (an error wrapping ErrEntryConflict). It does not validate them (checkRegistration).
func newEntrySet(entries []meshapi.Entry) (*entrySet, error) {
	s := &entrySet{
		byID:   make(map[spiffeid.ID]meshapi.Entry, len(entries)),
		byUID:  make(map[hostUID]spiffeid.ID, len(entries)),
		byPort: make(map[hostPort]spiffeid.ID),
	}
	for _, e := range entries {
		if err := s.conflict(e); err != nil {
			return nil, err
		}
		s.byID[e.ID] = e
		s.byUID[hostUID{e.Host, e.UID}] = e.ID
		if e.Port != 0 {
			s.byPort[hostPort{e.Host, e.Port}] = e.ID
		}
	}
	// Never nil, so that an empty set is written and listed as [] rather than null.
	s.sorted = append([]meshapi.Entry{}, slices.SortedFunc(slices.Values(entries), meshapi.CompareEntries)...)
	return s, nil
}

// conflict says why e cannot join s: its ID is registered already (one host per
// agent: unregister first), or another agent holds its uid or its port on its host.
func (s *entrySet) conflict(e meshapi.Entry) error {
	if old, ok := s.byID[e.ID]; ok {
		return fmt.Errorf("%w: %s is already registered to %s", ErrEntryConflict, e.ID, old.Host)
	}
	if other, ok := s.byUID[hostUID{e.Host, e.UID}]; ok {
		return fmt.Errorf("%w: uid %d on %s is already registered to %s", ErrEntryConflict, e.UID, e.Host, other)
	}
	if other, ok := s.byPort[hostPort{e.Host, e.Port}]; ok && e.Port != 0 {
		return fmt.Errorf("%w: port %d on %s is already registered to %s", ErrEntryConflict, e.Port, e.Host, other)
	}
	return nil
}

// with returns s plus e, or the conflict.
func (s *entrySet) with(e meshapi.Entry) (*entrySet, error) {
	if err := s.conflict(e); err != nil {
		return nil, err
	}
	return newEntrySet(append(slices.Clone(s.sorted), e))
}

// without returns s minus the entry of id and that entry, or ErrEntryNotFound.
func (s *entrySet) without(id spiffeid.ID) (*entrySet, meshapi.Entry, error) {
	old, ok := s.byID[id]
	if !ok {
		return nil, meshapi.Entry{}, fmt.Errorf("%w: %s", ErrEntryNotFound, id)
	}
	next, err := newEntrySet(slices.DeleteFunc(slices.Clone(s.sorted), func(e meshapi.Entry) bool { return e.ID == id }))
	return next, old, err // a subset never conflicts
}

// RegisterEntry adds e, for actor (who asked: the admin socket's uid; it goes to the
// audit log). It is written to StateDir/entries.json (atomically, before it is
// published) and published in the directory document, whose version moves so that
// every long-poll wakes at once. From then on the proxy of e.Host may obtain e.ID's
// SVIDs.
//
// Errors wrap ErrInvalidRequest (e is not an /agent/NAME ID and a /host/H host of the
// CA's trust domain), ErrEntryConflict (e.ID is registered already, to whichever host,
// or another agent holds e.UID, or e.Port when not 0, on e.Host), ErrRevoked (e.ID is
// revoked) or ErrServerClosed. Concurrent calls are serialised. Every call is audited
// (audit.Registration, Config.Audit) and logged.
//
// Registering an agent that was registered to another host before (a move:
// UnregisterEntry, then RegisterEntry with the new host) revokes every unexpired
// certificate of it not issued to e.Host, and lists them on the deny-list (audited as a
// revocation by actor): the old host keeps nothing usable. A failure there is
// returned; the entry stands.
func (s *Server) RegisterEntry(ctx context.Context, actor audit.Actor, e meshapi.Entry) error {
	version, err := s.registerEntry(e)
	s.logEntryChange(ctx, actionRegister, actor, e, version, err)
	s.audit(registrationRecord(actor, actionRegister, e, true, err))
	if err != nil {
		return err
	}
	return s.revokeOtherHosts(ctx, actor, e)
}

func (s *Server) registerEntry(e meshapi.Entry) (uint64, error) {
	if err := checkRegistration(s.cfg.TrustDomain, e); err != nil {
		return 0, err
	}
	if s.db.rev.idRevoked(e.ID) {
		return 0, fmt.Errorf("%w: %s", ErrRevoked, e.ID)
	}
	return s.changeEntries(func(cur *entrySet) (*entrySet, error) { return cur.with(e) })
}

// UnregisterEntry removes the entry of id and returns it, for actor (see
// RegisterEntry): persisted, then published in the directory document (so the proxy
// holding the identity drops it), from when on the CA refuses to renew id's SVIDs and
// to mint tokens for it on the mesh API. Errors wrap ErrEntryNotFound or
// ErrServerClosed. Audited and logged like RegisterEntry.
func (s *Server) UnregisterEntry(ctx context.Context, actor audit.Actor, id spiffeid.ID) (meshapi.Entry, error) {
	var removed meshapi.Entry
	version, err := s.changeEntries(func(cur *entrySet) (*entrySet, error) {
		next, old, err := cur.without(id)
		removed = old
		return next, err
	})
	known := err == nil
	if !known {
		removed = meshapi.Entry{ID: id}
	}
	s.logEntryChange(ctx, actionUnregister, actor, removed, version, err)
	s.audit(registrationRecord(actor, actionUnregister, removed, known, err))
	return removed, err
}

// Entries returns the registration entries in force, sorted by ID (a copy).
func (s *Server) Entries() []meshapi.Entry { return slices.Clone(s.entries.Load().sorted) }

// changeEntries applies change to the entries in force, persists the result and
// publishes it; it returns the directory version after it.
func (s *Server) changeEntries(change func(*entrySet) (*entrySet, error)) (uint64, error) {
	s.mu.Lock()
	state := s.state
	s.mu.Unlock()
	if state == stateClosed {
		return 0, ErrServerClosed
	}
	// Held across the file write: each change builds on the set the previous one
	// persisted, and nothing on a hot path takes it.
	s.entries.mu.Lock()
	defer s.entries.mu.Unlock()
	next, err := change(s.entries.Load())
	if err != nil {
		return 0, err
	}
	b, err := json.Marshal(entriesFile{Entries: next.sorted})
	if err != nil {
		return 0, fmt.Errorf("ca: registration entries: %w", err)
	}
	// 0600: the file maps local uids to identities, which is nobody else's business.
	if err := atomicfile.Write(filepath.Join(s.cfg.StateDir, fileEntries), b, 0o600); err != nil {
		return 0, fmt.Errorf("ca: registration entries: %w", err)
	}
	s.entries.Store(next)
	return s.dir.setEntries(next.sorted), nil
}

// loadEntries reads StateDir/entries.json (none: no entries) and publishes it. A file
// that does not parse, or holds an invalid or conflicting entry, stops New: it is
// written atomically, so it was edited by hand or tampered with.
func (s *Server) loadEntries() error {
	path := filepath.Join(s.cfg.StateDir, fileEntries)
	b, err := os.ReadFile(path)
	var set *entrySet
	switch {
	case errors.Is(err, fs.ErrNotExist):
		set, err = newEntrySet(nil)
	case err != nil:
		return fmt.Errorf("read registration entries: %w", err)
	default:
		set, err = parseEntriesFile(s.cfg.TrustDomain, path, b)
	}
	if err != nil {
		return err
	}
	s.entries.Store(set)
	if len(set.sorted) > 0 {
		s.dir.setEntries(set.sorted)
	}
	s.log.Info("registration entries loaded", keyEntries, len(set.sorted))
	return nil
}

// parseEntriesFile decodes b, the content of the entries file at path, for trust
// domain td: strict JSON, every entry valid, none conflicting. Its errors name path.
func parseEntriesFile(td spiffeid.TrustDomain, path string, b []byte) (*entrySet, error) {
	var f entriesFile
	if err := meshapi.DecodeStrict(bytes.NewReader(b), &f); err != nil {
		return nil, fmt.Errorf("registration entries %s: %w", path, err)
	}
	for _, e := range f.Entries {
		if err := checkRegistration(td, e); err != nil {
			return nil, fmt.Errorf("registration entries %s: %w", path, err)
		}
	}
	set, err := newEntrySet(f.Entries)
	if err != nil {
		return nil, fmt.Errorf("registration entries %s: %w", path, err)
	}
	return set, nil
}

// enforceRegistered refuses a certificate of an agent identity that no entry names:
// unregistering an agent stops its credentials at the next renewal, whoever tries it.
func (s *Server) enforceRegistered(cert *x509.Certificate) error {
	set := s.entries.Load()
	for _, u := range cert.URIs {
		if id, err := spiffeid.FromURI(u); err == nil && isAgentID(id) {
			if _, ok := set.byID[id]; !ok {
				return fmt.Errorf("%w: %s", ErrEntryNotFound, id)
			}
		}
	}
	return nil
}

// entryRefused reports whether an entry error is the request's fault (audited as
// "refused"), not the CA's ("error").
func entryRefused(err error) bool {
	return errors.Is(err, ErrInvalidRequest) || errors.Is(err, ErrEntryConflict) ||
		errors.Is(err, ErrEntryNotFound) || errors.Is(err, ErrRevoked)
}

// registrationRecord is the audit record of an entry action on e; withUID says whether
// e's UID is known (a refused unregister of an unknown ID has none).
func registrationRecord(actor audit.Actor, action string, e meshapi.Entry, withUID bool, err error) audit.Registration {
	rec := audit.Registration{Actor: actor, Action: action, Port: e.Port, Result: "ok"}
	if !e.ID.IsZero() {
		rec.SPIFFEID = e.ID.String()
	}
	if !e.Host.IsZero() {
		rec.Host = e.Host.String()
	}
	if withUID {
		uid := e.UID
		rec.UID = &uid
	}
	switch {
	case err == nil:
	case entryRefused(err):
		rec.Result, rec.Error = "refused", err.Error()
	default:
		rec.Result, rec.Error = "error", err.Error()
	}
	return rec
}

func (s *Server) logEntryChange(ctx context.Context, action string, actor audit.Actor, e meshapi.Entry, version uint64, err error) {
	attrs := []slog.Attr{slog.String(keyInitiator, actor.Initiator), slog.String(keySPIFFEID, e.ID.String())}
	if !e.Host.IsZero() {
		attrs = append(attrs, slog.String(keyHost, e.Host.String()), slog.Uint64(keyUID, uint64(e.UID)))
	}
	if e.Port != 0 {
		attrs = append(attrs, slog.Uint64(keyPort, uint64(e.Port)))
	}
	switch {
	case err == nil:
		s.log.LogAttrs(ctx, slog.LevelInfo, "registration entry "+action+"ed", append(attrs, slog.Uint64(keyVersion, version))...)
	case entryRefused(err):
		s.log.LogAttrs(ctx, slog.LevelInfo, "registration entry "+action+" refused", append(attrs, slog.String(keyErr, err.Error()))...)
	default:
		s.log.LogAttrs(ctx, slog.LevelError, "registration entry "+action+" failed", append(attrs, slog.String(keyErr, err.Error()))...)
	}
}
