package ca

import (
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/ca/authority"
)

// Token returns a one-time bootstrap token that enrols exactly id (a SPIFFE ID with a
// path in the CA's trust domain) once, within Config.TokenLifetime. It is signed by the
// provisioner key inside the token and never logged. Safe for concurrent use; valid
// between New and the end of Run.
//
// It fails with ErrRevoked for a revoked identity.
func (s *Server) Token(id spiffeid.ID) (string, error) {
	if s.db.rev.idRevoked(id) {
		return "", fmt.Errorf("%w: %s", ErrRevoked, id)
	}
	tok, exp, err := s.auth.Token(id)
	if err != nil {
		return "", err // already "ca: ..." (ErrInvalidID or ErrHSM)
	}
	s.log.Info("bootstrap token issued", keySPIFFEID, id.String(), keyExpires, exp)
	return tok, nil
}

// checkIssuable returns ErrInvalidID unless id is a workload ID in td.
func checkIssuable(td spiffeid.TrustDomain, id spiffeid.ID) error {
	return authority.CheckIssuable(td, id)
}

// issueToken hands out a bootstrap token for id to the caller rec names, and
// completes and writes rec with the outcome.
func (s *Server) issueToken(rec audit.Issuance, id spiffeid.ID) (string, error) {
	rec.Action, rec.SPIFFEID = audit.ActionToken, id.String()
	tok, err := s.Token(id)
	switch {
	case err == nil:
		rec.Result, rec.TokenID = audit.IssueOK, authority.TokenRecordID(tok)
	case errors.Is(err, ErrInvalidID):
		rec.Result, rec.Reason, rec.Error = audit.IssueRefused, audit.ReasonBadRequest, err.Error()
	case errors.Is(err, ErrRevoked):
		rec.Result, rec.Reason, rec.Error = audit.IssueRefused, audit.ReasonNotAllowed, err.Error()
	default:
		rec.Result, rec.Error = audit.IssueError, err.Error()
	}
	s.audit(rec)
	return tok, err
}

// refusedToken audits a token request refused before a token was made.
func (s *Server) refusedToken(rec audit.Issuance, reason audit.IssueReason, msg string) {
	rec.Action, rec.Result, rec.Reason, rec.Error = audit.ActionToken, audit.IssueRefused, reason, msg
	s.audit(rec)
}
