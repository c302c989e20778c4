package authority

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/go-chi/chi/v5/middleware"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"go.step.sm/crypto/jose"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/svidrules"
	"github.com/agentmesh/agentmesh/meshapi"
)

// Every bootstrap token, enrolment, renewal and rekey, granted or refused, is one
// audit.Issuance record naming its caller. Tokens are audited where they are handed
// out (admin socket, mesh API); certificates by auditIssuance around step-ca's
// handlers, which sees every outcome, refusals by the client-certificate check
// included. A record never holds a token: it is named by the SHA-256 of its ID.

const (
	// MaxSignBody bounds the body of /sign that auditIssuance reads ahead of step-ca
	// (a CSR and a token: a few KiB).
	MaxSignBody = 64 << 10
	// maxIssueAnswer bounds the copy of an answer auditIssuance reads the issued
	// certificate (or the error message) from.
	maxIssueAnswer = 64 << 10
	// InitiatorToken is the initiator of an enrolment: the bearer of its token.
	InitiatorToken = "token"
	// initiatorUnknown names a caller that presented no usable identity.
	initiatorUnknown = "unauthenticated"
)

// issueAction is the action of a step-ca issuance route (at / and at /1.0), if r is
// one.
func issueAction(r *http.Request) (audit.IssueAction, bool) {
	if r.Method != http.MethodPost {
		return "", false
	}
	switch strings.TrimPrefix(r.URL.Path, "/1.0") {
	case "/sign":
		return audit.ActionEnroll, true
	case "/renew", "/re-sign":
		return audit.ActionRenew, true
	case "/rekey":
		return audit.ActionRekey, true
	}
	return "", false
}

type issueAttemptKey struct{}

// issueAttempt carries what the layers under auditIssuance learn about a refusal.
type issueAttempt struct{ reason audit.IssueReason }

// noteRefusal tells the issuance record of r's request, if any, why it was refused.
func noteRefusal(r *http.Request, reason audit.IssueReason) {
	if a, ok := r.Context().Value(issueAttemptKey{}).(*issueAttempt); ok {
		a.reason = reason
	}
}

// AuditIssuance writes the issuance record of every /sign, /renew and /rekey request.
func (a *Authority) AuditIssuance(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		action, ok := issueAction(r)
		if !ok {
			next.ServeHTTP(w, r)
			return
		}
		start := time.Now()
		rec := audit.Issuance{Action: action, Actor: audit.TLSActor(r.TLS), PeerAddr: r.RemoteAddr}
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			rec.SPIFFEID = certID(r.TLS.PeerCertificates[0])
		}
		var jti string
		if action == audit.ActionEnroll {
			body, err := io.ReadAll(io.LimitReader(r.Body, MaxSignBody+1))
			if err != nil || len(body) > MaxSignBody {
				rec.Result, rec.Reason, rec.Error = audit.IssueRefused, audit.ReasonBadRequest, "request body unreadable or too large"
				a.issued(rec, start)
				WriteError(w, http.StatusRequestEntityTooLarge, rec.Error)
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
			var sub string
			jti, sub = signToken(body)
			rec.Initiator, rec.TokenID, rec.SPIFFEID = InitiatorToken, tokenIDHash(jti), sub
			a.uses.begin(jti)
		}
		att := &issueAttempt{}
		ww := middleware.NewWrapResponseWriter(w, r.ProtoMajor)
		answer := &firstBytes{max: maxIssueAnswer}
		ww.Tee(answer)
		next.ServeHTTP(ww, r.WithContext(context.WithValue(r.Context(), issueAttemptKey{}, att)))

		status := ww.Status()
		refused := status >= 400
		reused := action == audit.ActionEnroll && a.uses.end(jti, refused)
		switch {
		case status >= 500:
			rec.Result, rec.Error = audit.IssueError, meshapi.ErrorMessage(answer.b)
		case refused:
			rec.Result, rec.Error = audit.IssueRefused, meshapi.ErrorMessage(answer.b)
			rec.Reason = issueRefusal(action, status, att.reason, reused)
		default:
			rec.Result = audit.IssueOK
			if chain, err := meshapi.ParseSignResponse(answer.b); err == nil && len(chain) > 0 {
				rec.SPIFFEID, rec.Serial, rec.NotAfter = certID(chain[0]), chain[0].SerialNumber.String(), chain[0].NotAfter
			}
		}
		a.issued(rec, start)
	})
}

// issued writes an issuance request's record and tells Config.Issued, if set, how
// long the request since start took.
func (a *Authority) issued(rec audit.Issuance, start time.Time) {
	a.audit(rec)
	if a.cfg.Issued != nil {
		a.cfg.Issued(rec.Action, rec.Result, time.Since(start))
	}
}

// issueRefusal names why an issuance request was refused: what a layer noted, else
// what the status says of the action.
func issueRefusal(action audit.IssueAction, status int, noted audit.IssueReason, reused bool) audit.IssueReason {
	switch {
	case noted != "":
		return noted
	case reused:
		return audit.ReasonTokenReused
	case status == http.StatusUnauthorized && action == audit.ActionEnroll:
		return audit.ReasonTokenInvalid
	case status == http.StatusUnauthorized:
		return audit.ReasonCertificateInvalid
	case status == http.StatusBadRequest || status == http.StatusRequestEntityTooLarge:
		return audit.ReasonBadRequest
	}
	return audit.ReasonNotAllowed
}

// certID is the SPIFFE ID a certificate names, for a record: "unauthenticated" when it
// names none, or one longer than a SPIFFE ID may be.
func certID(c *x509.Certificate) string {
	id, err := x509svid.IDFromCert(c)
	if err != nil || len(id.String()) > svidrules.MaxIDLength {
		return initiatorUnknown
	}
	return id.String()
}

// signToken reads the ID (jti) and subject of the token in a /sign body, without
// verifying it (step-ca does): a record names the token even when it is refused.
func signToken(body []byte) (jti, sub string) {
	var req struct {
		OTT string `json:"ott"`
	}
	if json.Unmarshal(body, &req) != nil || req.OTT == "" {
		return "", ""
	}
	return tokenClaimsOf(req.OTT)
}

// tokenClaimsOf reads the ID and subject of a token without verifying it.
func tokenClaimsOf(tok string) (jti, sub string) {
	jwt, err := jose.ParseSigned(tok)
	if err != nil {
		return "", ""
	}
	var c jose.Claims
	if jwt.UnsafeClaimsWithoutVerification(&c) != nil {
		return "", ""
	}
	if id, err := spiffeid.FromString(c.Subject); err == nil && len(c.Subject) <= svidrules.MaxIDLength {
		sub = id.String()
	}
	return c.ID, sub
}

// tokenIDHash names a token in records: the SHA-256 (hex) of its ID, "" for none.
func tokenIDHash(jti string) string {
	if jti == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(jti))
	return hex.EncodeToString(sum[:])
}

// TokenRecordID names a token in records: the SHA-256 (hex) of its ID, "" for none.
// The token is not verified.
func TokenRecordID(tok string) string {
	jti, _ := tokenClaimsOf(tok)
	return tokenIDHash(jti)
}

// UseToken is step-ca's database hook for a used token ID, with two changes: use
// records the token as its SHA-256, where step-ca stores the token itself (reuse
// detection only needs the key, and no token is kept in plain text on disk), and a
// reuse is told to the issuance record of the request that presented it.
func (a *Authority) UseToken(id, tok string, use func(id, value string) (bool, error)) (bool, error) {
	sum := sha256.Sum256([]byte(tok))
	ok, err := use(id, "sha256:"+hex.EncodeToString(sum[:]))
	if err == nil && !ok {
		a.uses.refusedReuse(id)
	}
	return ok, err
}

// tokenUses tells AuditIssuance which enrolments step-ca refused for a token used
// before: step-ca's database hook (UseToken) sees the reuse but not the
// request, the handler the request but only a 401. Entries live while a request for
// their token ID is in flight, so the map is bounded by concurrent requests. Safe for
// concurrent use.
type tokenUses struct {
	mu sync.Mutex
	m  map[string]*tokenUse
}

type tokenUse struct{ inFlight, reused int }

func newTokenUses() *tokenUses { return &tokenUses{m: make(map[string]*tokenUse)} }

// begin marks a request for token ID id in flight.
func (u *tokenUses) begin(id string) {
	if id == "" {
		return
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	e := u.m[id]
	if e == nil {
		e = &tokenUse{}
		u.m[id] = e
	}
	e.inFlight++
}

// refusedReuse records that step-ca refused id as used before.
func (u *tokenUses) refusedReuse(id string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if e := u.m[id]; e != nil {
		e.reused++
	}
}

// end ends a request for id and, for a refused one, reports whether the refusal was a
// reuse (each reuse is claimed by one refused request).
func (u *tokenUses) end(id string, refused bool) bool {
	if id == "" {
		return false
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	e := u.m[id]
	if e == nil {
		return false
	}
	reused := refused && e.reused > 0
	if reused {
		e.reused--
	}
	if e.inFlight--; e.inFlight == 0 {
		delete(u.m, id)
	}
	return reused
}

// firstBytes keeps the first max bytes written to it and drops the rest.
type firstBytes struct {
	b   []byte
	max int
}

func (f *firstBytes) Write(p []byte) (int, error) {
	f.b = append(f.b, p[:min(len(p), f.max-len(f.b))]...)
	return len(p), nil
}

// audit writes ev to Config.Audit, if set.
func (a *Authority) audit(ev audit.Event) {
	if a.cfg.Audit != nil {
		a.cfg.Audit(ev)
	}
}
