package ca

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"github.com/agentmesh/agentmesh/meshapi"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	stepauthority "github.com/smallstep/certificates/authority"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/ca/authority"
)

// metricLineageRefused counts issuances refused by the lineage rules, by reason.
const metricLineageRefused = "agentmesh_ca_lineage_refused_total"

// Issuance requests of step-ca's API the lineage guard looks at.
type issuanceOp string

const (
	opRenew issuanceOp = "renew"
	opRekey issuanceOp = "rekey"
	opSign  issuanceOp = "sign"
)

// issuanceOpOf returns the issuance request of a step-ca API path (at / or /1.0).
func issuanceOpOf(path string) (issuanceOp, bool) {
	switch op := issuanceOp(strings.TrimPrefix(strings.TrimPrefix(path, "/1.0"), "/")); op {
	case opRenew, opRekey, opSign:
		return op, true
	}
	return "", false
}

func newLineageMetric() *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: metricLineageRefused,
		Help: "Renewals, rekeys and enrolments the CA refused because of the identity's lineage, by reason.",
	}, []string{labelReason})
	for _, r := range allRenewRefusals {
		c.WithLabelValues(string(r))
	}
	return c
}

// guardLineage applies the lineage rules to step-ca's issuance requests before step-ca
// sees them, so that each refusal is audited with the caller and the presenting serial
// (step-ca refuses a serial it revoked itself before asking the renewal authorisation).
// A /renew or /rekey over mTLS is checked with checkRenewal. A /sign whose token was
// granted to a host for an agent is refused when the agent's registration names
// another host now, and otherwise binds the CSR's key to that host for the store.
// authorizeRenew and the certificate store apply the same rules again, atomically.
func (s *Server) guardLineage(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		op, ok := issuanceOpOf(r.URL.Path)
		if !ok || r.Method != http.MethodPost {
			next.ServeHTTP(w, r)
			return
		}
		if op != opSign {
			if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
				if err := s.authorizeLineage(r.Context(), op, r.TLS.PeerCertificates[0], r.RemoteAddr); err != nil {
					writeStepError(w, lineageStatus(err), err.Error())
					return
				}
			}
			next.ServeHTTP(w, r)
			return
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, authority.MaxSignBody))
		if err != nil {
			writeStepError(w, http.StatusBadRequest, "error reading request body")
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		var req meshapi.SignRequest
		_ = json.Unmarshal(body, &req) // step-ca answers a malformed body
		if host, ok := s.db.lin.grantedHost(req.OTT); ok {
			claims, _ := tokenPayload(req.OTT)
			if id, err := spiffeid.FromString(claims.Subject); err == nil {
				if reg, ok := s.db.lin.registered(id); !ok || reg != host {
					msg := fmt.Sprintf("%s: %s is not registered to %s", refusedNotRegisteredHost, id, host)
					s.lineageRefused(r.Context(), audit.Lineage{Op: string(opSign), Caller: id.String(), Host: host.String(),
						PeerAddr: r.RemoteAddr, Reason: string(refusedNotRegisteredHost)}, msg)
					writeStepError(w, http.StatusForbidden, msg)
					return
				}
			}
		}
		defer s.db.lin.bindCSR(req.OTT, req.CSR)()
		next.ServeHTTP(w, r)
	})
}

// authorizeLineage refuses (audited, counted) a renewal or rekey of cert that the
// lineage rules do not allow; peerAddr is the caller's address when known.
func (s *Server) authorizeLineage(ctx context.Context, op issuanceOp, cert *x509.Certificate, peerAddr string) error {
	reason, head, err := s.db.lin.checkRenewal(cert)
	if err != nil {
		s.log.Error("lineage check failed", keySerial, cert.SerialNumber.String(), keyErr, err)
		return fmt.Errorf("ca: lineage check: %w", err)
	}
	if reason == "" {
		return nil
	}
	id, _ := x509svid.IDFromCert(cert)
	serial := cert.SerialNumber.String()
	msg := fmt.Sprintf("%s: %s: %s serial %s", ErrRenewalRefused.Error(), reason, id, serial)
	if reason == refusedFork {
		msg += " is not the newest certificate of its identity nor the one it replaced"
	}
	s.lineageRefused(ctx, audit.Lineage{Op: string(op), Caller: id.String(), Serial: serial, Head: head,
		PeerAddr: peerAddr, Reason: string(reason)}, msg)
	return fmt.Errorf("%w: %s", ErrRenewalRefused, msg)
}

// lineageStatus is the HTTP status of an authorizeLineage error: 403 for a refusal (the
// client treats it as permanent), 500 for a failure.
func lineageStatus(err error) int {
	if errors.Is(err, ErrRenewalRefused) {
		return http.StatusForbidden
	}
	return http.StatusInternalServerError
}

// lineageRefused audits, counts and logs a refusal.
func (s *Server) lineageRefused(ctx context.Context, rec audit.Lineage, msg string) {
	rec.Result = "refused"
	s.db.lin.refusals.WithLabelValues(rec.Reason).Inc()
	s.audit(rec)
	s.log.LogAttrs(ctx, slog.LevelWarn, "issuance refused by the lineage",
		slog.String(keyOp, rec.Op), slog.String(keySPIFFEID, rec.Caller), slog.String(keySerial, rec.Serial),
		slog.String(keyReason, rec.Reason), slog.String(keyErr, msg))
}

// mayRevokeLineage is the mesh API's authorisation of a lineage revocation by a
// workload: only of its own identity, keeping the very certificate it presents. The
// proxy that rotated away from a compromised key asks it with its new certificate.
func mayRevokeLineage(caller spiffeid.ID, callerSerial string, t revokeTarget) bool {
	return t.except != "" && t.id == caller && t.except == callerSerial
}

// revokeLineage is Revoke for a request with Except: every unexpired certificate of the
// identity's lineage but Except, which must be the newest, is marked revoked, listed
// on the next deny-list and revoked in step-ca. The caller holds revokeMu.
func (s *Server) revokeLineage(ctx context.Context, auth *stepauthority.Authority, t revokeTarget, now time.Time) (*meshapi.RevokeResult, error) {
	return s.revokeLineageWhere(ctx, auth, t.id, t.except, func(e lineageEntry) bool { return e.Serial == t.except }, t.reason, now)
}

func (s *Server) revokeLineageWhere(ctx context.Context, auth *stepauthority.Authority, id spiffeid.ID, head string,
	keep func(lineageEntry) bool, reason string, now time.Time) (*meshapi.RevokeResult, error) {
	marked, markErr := s.db.lin.revokeWhere(id, head, keep, reason, now)
	if markErr != nil && len(marked) == 0 {
		return nil, fmt.Errorf("ca: revoke: %w", markErr)
	}
	st, err := s.publishMarks(now)
	if err != nil {
		return nil, fmt.Errorf("ca: revoke: %w", errors.Join(markErr, err))
	}
	res := &meshapi.RevokeResult{ListVersion: st.list.Version, Serials: make([]string, 0, len(marked))}
	var entries []meshapi.DeniedSerial
	for _, m := range marked {
		for _, e := range targetSerials(st.list, revokeTarget{serial: m.Serial}) {
			entries = append(entries, e)
			res.Serials = append(res.Serials, e.Serial)
		}
	}
	if markErr != nil {
		return res, fmt.Errorf("ca: revoke: %w", markErr)
	}
	if auth != nil {
		if err := s.revokeInStepCA(ctx, auth, entries); err != nil {
			return res, fmt.Errorf("ca: revoke: %w", err)
		}
	} // else: Run revokes every listed serial in step-ca when it starts.
	return res, nil
}

// revokeOtherHosts revokes, after e was registered, every certificate of e's agent
// that was not issued to e's host: the certificates a previous host holds after a
// move (and those of unknown host). Nothing to revoke is no revocation. The outcome
// is audited as a revocation by actor.
func (s *Server) revokeOtherHosts(ctx context.Context, actor audit.Actor, e meshapi.Entry) error {
	lin, err := s.db.lin.lineage(e.ID)
	if err != nil {
		return fmt.Errorf("ca: revoke certificates of the previous host: %w", err)
	}
	now := time.Now()
	stale := false
	for _, c := range lin {
		stale = stale || (c.Host != e.Host && now.Before(c.NotAfter))
	}
	if !stale {
		return nil
	}
	reason := "registered to " + e.Host.String()
	s.deny.mu.Lock()
	s.mu.Lock()
	state, auth := s.state, s.auth.Step()
	s.mu.Unlock()
	var res *meshapi.RevokeResult
	if state == stateClosed {
		err = ErrServerClosed
	} else {
		res, err = s.revokeLineageWhere(ctx, auth, e.ID, "", func(c lineageEntry) bool { return c.Host == e.Host }, reason, now)
	}
	s.deny.mu.Unlock()
	rec := audit.Revocation{Actor: actor, SPIFFEID: e.ID.String(), Reason: reason, Result: "ok"}
	if res != nil {
		rec.Serials, rec.ListVersion = res.Serials, res.ListVersion
	}
	if err != nil {
		rec.Result, rec.Error = "error", err.Error()
		s.log.Error("revocation of the previous host's certificates failed", keySPIFFEID, e.ID.String(), keyErr, err)
	} else {
		s.log.Info("previous host's certificates revoked", keySPIFFEID, e.ID.String(), keyHost, e.Host.String(),
			keySerials, res.Serials, keyListVersion, res.ListVersion)
	}
	s.audit(rec)
	return err
}

// parseCSRPEM parses a PEM certificate request.
func parseCSRPEM(s string) (*x509.CertificateRequest, error) {
	block, _ := pem.Decode([]byte(s))
	if block == nil {
		return nil, errors.New("no PEM block")
	}
	return x509.ParseCertificateRequest(block.Bytes)
}
