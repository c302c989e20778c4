package ca

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/agentmesh/agentmesh/meshapi"

	"github.com/smallstep/certificates/authority"
	"github.com/smallstep/certificates/authority/provisioner"
	"github.com/smallstep/nosql/database"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/atomicfile"
)

// denyState is the deny-list in force: the list, its signed form and that form's
// JSON, built once per version. Immutable.
type denyState struct {
	list    *meshapi.DenyList
	signed  *meshapi.SignedDenyList
	encoded []byte
}

// revokeTarget is a validated RevokeRequest.
type revokeTarget struct {
	id     spiffeid.ID // set when revoking an identity
	serial string      // set when revoking a certificate
	except string      // with id: revoke id's lineage but this serial
	reason string
}

// parseRevokeRequest validates req for trust domain td.
func parseRevokeRequest(td spiffeid.TrustDomain, req meshapi.RevokeRequest) (revokeTarget, error) {
	t := revokeTarget{reason: req.Reason}
	id, err := req.Check(td)
	if err != nil {
		return t, err
	}
	if req.Serial != "" {
		t.serial = req.Serial
		return t, nil
	}
	t.id, t.except = id, req.Except
	return t, nil
}

// Revoke revokes an identity or a certificate, for actor (who asked: the uid
// on the admin socket, the SPIFFE ID and serial of the caller over mTLS; it goes to the
// audit log).
//
// Enforcement comes first: the revocation is recorded in the database, from when on
// the CA refuses tokens, issuance, renewal and directory registration for it. Then the
// next deny-list version (the previous one plus the identity and each of its live
// serials, or the serial) is signed by the intermediate's key in the HSM, written to
// StateDir/denylist.json and published: the directory version moves, which wakes every
// long-poll at once, and the revoked proxy's directory entry is removed. Last, step-ca
// revokes each serial (passive revocation: no renewal; the CRL is regenerated).
//
// A failure after the record leaves the revocation enforced: it is returned (with the
// result too when only step-ca's part failed), and retrying the same request completes
// the rest; a CA that crashed in between completes it when it starts again. Before
// Run, step-ca's part waits for Run to start.
//
// Revoking what is already revoked changes nothing and succeeds with the current
// version. Errors wrap ErrInvalidRequest or ErrInvalidID (bad request),
// ErrUnknownSerial (a serial this CA never issued) or ErrServerClosed. Concurrent calls
// are serialised. Every call is audited (Config.Audit) and logged.
func (s *Server) Revoke(ctx context.Context, actor audit.Actor, req meshapi.RevokeRequest) (*meshapi.RevokeResult, error) {
	return s.revokeVia(ctx, actor, "", req)
}

// revokeVia is Revoke for a request that came through via (audit.Revocation.Via).
func (s *Server) revokeVia(ctx context.Context, actor audit.Actor, via string, req meshapi.RevokeRequest) (*meshapi.RevokeResult, error) {
	res, err := s.revoke(ctx, req)
	rec := audit.Revocation{Actor: actor, SPIFFEID: req.SPIFFEID, Serial: req.Serial, Reason: req.Reason,
		Result: "ok", Via: via}
	if res != nil {
		rec.Serials, rec.ListVersion = res.Serials, res.ListVersion
	}
	attrs := []slog.Attr{slog.String(keyInitiator, actor.Initiator), slog.String(keyReason, req.Reason)}
	if req.SPIFFEID != "" {
		attrs = append(attrs, slog.String(keySPIFFEID, req.SPIFFEID))
	}
	if req.Serial != "" {
		attrs = append(attrs, slog.String(keySerial, req.Serial))
	}
	switch {
	case err == nil:
		s.status.revokedBy(req, actor.Initiator)
		s.log.LogAttrs(ctx, slog.LevelInfo, "revoked", append(attrs,
			slog.Uint64(keyListVersion, res.ListVersion), slog.Any(keySerials, res.Serials))...)
	case revokeRefused(err):
		rec.Result, rec.Error = "refused", err.Error()
		s.log.LogAttrs(ctx, slog.LevelInfo, "revocation refused", append(attrs, slog.String(keyErr, err.Error()))...)
	default:
		rec.Result, rec.Error = "error", err.Error()
		s.log.LogAttrs(ctx, slog.LevelError, "revocation failed", append(attrs, slog.String(keyErr, err.Error()))...)
	}
	s.audit(rec)
	return res, err
}

// revokeRefused reports whether a Revoke error is the request's fault.
func revokeRefused(err error) bool {
	return errors.Is(err, ErrInvalidRequest) || errors.Is(err, ErrInvalidID) || errors.Is(err, ErrUnknownSerial) ||
		errors.Is(err, ErrNotLineageHead)
}

// audit appends ev to Config.Audit, if any. A failure is logged: the action it
// records has happened and is not undone.
func (s *Server) audit(ev audit.Event) {
	if s.cfg.Audit == nil {
		return
	}
	if err := s.cfg.Audit.Append(ev); err != nil {
		s.log.Error("audit record lost", keyKind, ev.Kind(), keyErr, err)
	}
}

// auditSyncTimeout bounds how long auditDurable waits for the audit log's fsync.
const auditSyncTimeout = 5 * time.Second

// auditDurable writes ev and, when the audit log can say so, waits until it is on
// disk: a state change persisted after it never lacks its record, even across a
// SIGKILL.
func (s *Server) auditDurable(ev audit.Event) error {
	if s.cfg.Audit == nil {
		return nil
	}
	if err := s.cfg.Audit.Append(ev); err != nil {
		return err
	}
	l, ok := s.cfg.Audit.(interface{ Sync(context.Context) error })
	if !ok {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), auditSyncTimeout)
	defer cancel()
	return l.Sync(ctx)
}

func (s *Server) revoke(ctx context.Context, req meshapi.RevokeRequest) (*meshapi.RevokeResult, error) {
	t, err := parseRevokeRequest(s.cfg.TrustDomain, req)
	if err != nil {
		return nil, err
	}
	// One revocation at a time: each builds on the version the previous one
	// published. Held across I/O (database, HSM, file, step-ca) on purpose; nothing on
	// a hot path takes it.
	s.deny.mu.Lock()
	defer s.deny.mu.Unlock()

	s.mu.Lock()
	state, auth := s.state, s.auth.Step()
	s.mu.Unlock()
	if state == stateClosed {
		return nil, ErrServerClosed
	}

	now := time.Now().UTC().Round(0)
	if t.except != "" {
		return s.revokeLineage(ctx, auth, t, now)
	}
	// The cutoff: a certificate issued at time T has NotBefore T minus the backdate
	// (or earlier), and storeIssued refuses, from the mark on, any certificate of the
	// identity with a NotBefore before the cutoff, so the cutoff denies exactly the
	// certificates issued before the revocation.
	m := revocationMark{SPIFFEID: t.id, Serial: t.serial, Reason: t.reason, RevokedAt: now}
	if t.serial == "" {
		m.Cutoff = now.Add(-s.db.rev.backdate)
	}
	if t.serial != "" {
		cert, err := s.db.GetCertificate(t.serial)
		if database.IsErrNotFound(err) {
			return nil, fmt.Errorf("%w: %s", ErrUnknownSerial, t.serial)
		}
		if err != nil {
			return nil, fmt.Errorf("ca: revoke: read certificate %s: %w", t.serial, err)
		}
		m.NotAfter = cert.NotAfter.UTC()
		if id, err := x509svid.IDFromCert(cert); err == nil {
			m.SPIFFEID = id
		}
	}
	if _, err := s.db.rev.mark(m); err != nil {
		return nil, fmt.Errorf("ca: revoke: %w", err)
	}
	st, err := s.publishMarks(now)
	if err != nil {
		return nil, fmt.Errorf("ca: revoke: %w", err)
	}
	entries := targetSerials(st.list, t)
	res := &meshapi.RevokeResult{ListVersion: st.list.Version, Serials: make([]string, 0, len(entries))}
	for _, e := range entries {
		res.Serials = append(res.Serials, e.Serial)
	}
	if auth != nil {
		if err := s.revokeInStepCA(ctx, auth, entries); err != nil {
			return res, fmt.Errorf("ca: revoke: %w", err)
		}
	} // else: Run revokes every listed serial in step-ca when it starts.
	return res, nil
}

// targetSerials are the entries of l that t's revocation covers.
func targetSerials(l *meshapi.DenyList, t revokeTarget) []meshapi.DeniedSerial {
	var out []meshapi.DeniedSerial
	for _, e := range l.Serials {
		if (t.serial != "" && e.Serial == t.serial) || (t.serial == "" && e.SPIFFEID == t.id) {
			out = append(out, e)
		}
	}
	return out
}

// publishMarks makes sure every recorded revocation whose certificates have not all
// expired is on the deny-list, and that no entry whose certificates have all expired
// is: when either is not so, it signs the next version, persists and publishes it. It
// returns the state in force. The caller holds revokeMu (or is New).
func (s *Server) publishMarks(now time.Time) (*denyState, error) {
	cur := s.deny.Load()
	var ids []meshapi.DeniedID
	var serials []meshapi.DeniedSerial
	marks := s.db.rev.all()
	for _, m := range marks.ids {
		if slices.ContainsFunc(cur.list.IDs, func(e meshapi.DeniedID) bool {
			return e.SPIFFEID == m.SPIFFEID && e.RevokedAt.Equal(m.RevokedAt)
		}) {
			continue
		}
		// Every live certificate the revocation covers is listed too, so that a peer
		// holding only a serial (a proxy's own credential, a CRL reader) sees it.
		live, err := s.db.rev.liveSerials(m.SPIFFEID, m.Cutoff, now)
		if err != nil {
			return nil, err
		}
		e := meshapi.DeniedID{SPIFFEID: m.SPIFFEID, Reason: m.Reason, RevokedAt: m.RevokedAt, NotBefore: m.Cutoff,
			NotAfter: s.coveredUntil(m, live)}
		if !e.NotAfter.After(now) {
			continue // listed and dropped since, or covering nothing live
		}
		ids = append(ids, e)
		for _, is := range live {
			serials = append(serials, meshapi.DeniedSerial{Serial: is.Serial, SPIFFEID: e.SPIFFEID, Reason: e.Reason,
				RevokedAt: e.RevokedAt, NotAfter: is.NotAfter.UTC()})
		}
	}
	for _, m := range marks.serials {
		if !m.NotAfter.IsZero() && !m.NotAfter.After(now) {
			continue // expired: listed and dropped since, or never worth listing
		}
		serials = append(serials, meshapi.DeniedSerial{Serial: m.Serial, SPIFFEID: m.SPIFFEID, Reason: m.Reason,
			RevokedAt: m.RevokedAt, NotAfter: m.NotAfter})
	}
	next, changed := cur.list.Successor(now, ids, serials)
	if !changed {
		return cur, nil
	}
	return s.putDenyList(next)
}

// putDenyList signs next with the active intermediate's key, persists it and puts it
// in force. The caller holds revokeMu (or is New).
func (s *Server) putDenyList(next *meshapi.DenyList) (*denyState, error) {
	st, err := s.signDenyState(next)
	if err != nil {
		return nil, err
	}
	// Persisted before it is published: a version peers have seen is never lost
	// (and never re-signed with other content) by a crash.
	if err := atomicfile.Write(filepath.Join(s.cfg.StateDir, fileDenyList), st.encoded, 0o644); err != nil {
		return nil, err
	}
	s.deny.Store(st)
	s.dir.setRevocations(st.signed, st.list)
	select { // the pruning loop learns the new list's expiries
	case s.deny.wake <- struct{}{}:
	default:
	}
	s.log.Info("deny list published", keyListVersion, next.Version,
		keyIDs, len(next.IDs), keySerials, len(next.Serials))
	return st, nil
}

// coveredUntil is when the last certificate a revocation of an identity covers
// expires, at the latest: the latest NotAfter of its live indexed certificates, and no
// earlier than the revocation plus the SVID lifetime, which bounds any certificate
// issued before it (whether indexed or not). A serial's revocation covers until its
// NotAfter.
func (s *Server) coveredUntil(m revocationMark, live []issuedSerial) time.Time {
	until := m.RevokedAt.Add(s.cfg.SVIDLifetime)
	for _, is := range live {
		if is.NotAfter.After(until) {
			until = is.NotAfter
		}
	}
	return until.UTC()
}

// signDenyState signs l with the active intermediate's key (in the HSM).
func (s *Server) signDenyState(l *meshapi.DenyList) (*denyState, error) {
	signer, inter := s.auth.ActiveSigner()
	signed, err := meshapi.SignDenyList(l, signer, inter)
	if err != nil {
		return nil, err
	}
	b, err := json.Marshal(signed)
	if err != nil {
		return nil, fmt.Errorf("encode deny list: %w", err)
	}
	return &denyState{list: l, signed: signed, encoded: b}, nil
}

// parseDenyListFile decodes b, the content of the deny-list file at path: a signed
// list of trust domain td that verifies against roots at now. Its errors name path.
func parseDenyListFile(path string, b []byte, td spiffeid.TrustDomain, roots []*x509.Certificate, now time.Time) (*denyState, error) {
	var signed meshapi.SignedDenyList
	if err := meshapi.DecodeStrict(bytes.NewReader(b), &signed); err != nil {
		return nil, fmt.Errorf("deny list %s: %w", path, err)
	}
	l, err := meshapi.VerifyDenyList(&signed, td, roots, now)
	if err != nil {
		return nil, fmt.Errorf("deny list %s: %w", path, err)
	}
	return &denyState{list: l, signed: &signed, encoded: b}, nil
}

// initDenyList loads the persisted deny-list, or signs and persists version 1 (empty)
// on first start, then publishes any revocation recorded but not listed (a crash
// between the two). A persisted list is served unchanged: it is never re-signed.
func (s *Server) initDenyList(now time.Time) error {
	path := filepath.Join(s.cfg.StateDir, fileDenyList)
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if marks := s.db.rev.all(); len(marks.ids)+len(marks.serials) > 0 {
			s.log.Error("deny list missing while the database records revocations: starting again at version 1; "+
				"proxies holding a later version will refuse it", keyPath, path)
		}
		first := meshapi.FirstDenyList(s.cfg.TrustDomain.Name(), now)
		st, err := s.signDenyState(first)
		if err != nil {
			return err
		}
		if err := atomicfile.Write(path, st.encoded, 0o644); err != nil {
			return err
		}
		s.deny.Store(st)
	case err != nil:
		return fmt.Errorf("read deny list: %w", err)
	default:
		st, err := parseDenyListFile(path, b, s.cfg.TrustDomain, s.auth.Anchors(), now)
		if err != nil {
			return err
		}
		s.deny.Store(st)
	}
	s.dir.setRevocations(s.deny.Load().signed, s.deny.Load().list)
	st, err := s.publishMarks(now)
	if err != nil {
		return err
	}
	s.log.Info("deny list loaded", keyListVersion, st.list.Version,
		keyIDs, len(st.list.IDs), keySerials, len(st.list.Serials))
	return nil
}

// revokeInStepCA has step-ca revoke each serial not revoked yet (passively: renewal is
// refused; the CRL is regenerated on each).
func (s *Server) revokeInStepCA(ctx context.Context, auth *authority.Authority, entries []meshapi.DeniedSerial) error {
	// The revocation is the CA's own decision, already authorised: it uses step-ca's
	// certificate path (the certificate is read from the database) rather than a
	// one-time token minted for itself.
	ctx = provisioner.NewContextWithMethod(ctx, provisioner.RevokeMethod)
	var errs []error
	for _, e := range entries {
		serial := e.Serial
		revoked, err := auth.IsRevoked(serial)
		if err != nil {
			errs = append(errs, fmt.Errorf("step-ca revocation of %s: %w", serial, err))
			continue
		}
		if revoked {
			continue
		}
		cert, err := s.db.GetCertificate(serial)
		if err != nil {
			errs = append(errs, fmt.Errorf("step-ca revocation of %s: %w", serial, err))
			continue
		}
		if err := auth.Revoke(ctx, &authority.RevokeOptions{
			Serial: serial, Reason: e.Reason, PassiveOnly: true, MTLS: true, Crt: cert,
		}); err != nil {
			errs = append(errs, fmt.Errorf("step-ca revocation of %s: %w", serial, err))
		}
	}
	return errors.Join(errs...)
}

// reconcileStepCA revokes in step-ca every serial of the deny-list that step-ca has
// not revoked: those of a Revoke before Run, or interrupted by a crash.
func (s *Server) reconcileStepCA(ctx context.Context, auth *authority.Authority) {
	s.deny.mu.Lock()
	defer s.deny.mu.Unlock()
	now := time.Now()
	live := slices.DeleteFunc(slices.Clone(s.deny.Load().list.Serials), func(e meshapi.DeniedSerial) bool {
		return !e.NotAfter.IsZero() && !now.Before(e.NotAfter)
	})
	if err := s.revokeInStepCA(ctx, auth, live); err != nil {
		s.log.Error("step-ca revocation of listed serials failed; the deny-list still denies them", keyErr, err)
	}
}
