package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"go.step.sm/crypto/jose"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/ca/authority"
	"github.com/agentmesh/agentmesh/internal/metrictest"
	"github.com/agentmesh/agentmesh/meshapi"
)

// eventsOf returns the records of type E that r holds, in order.
func eventsOf[E audit.Event](r *auditRecorder) []E {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []E
	for _, e := range r.events {
		if ev, ok := e.(E); ok {
			out = append(out, ev)
		}
	}
	return out
}

// TestIssuanceAudit: every token, enrolment, renewal and rekey the CA is asked for,
// granted or refused, is exactly one issuance record naming its caller, and each but
// the tokens is timed in agentmesh_ca_issue_duration_seconds by action and result; no
// record holds a token.
func TestIssuanceAudit(t *testing.T) {
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	cfg.Audit = rec
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	ca := startCA(t, cfg)
	ctx := context.Background()
	id := spiffeid.RequireFromPath(testTD, "/workload/audited")
	admin := audit.PeerUIDActor(os.Getuid()).Initiator

	// A token through the admin socket, then an enrolment with it.
	tok, err := RequestToken(ctx, cfg.StateDir, id)
	if err != nil {
		t.Fatal(err)
	}
	jwt, err := jose.ParseSigned(tok)
	if err != nil {
		t.Fatal(err)
	}
	var claims jose.Claims
	if err := jwt.UnsafeClaimsWithoutVerification(&claims); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(claims.ID))
	tokenID := hex.EncodeToString(sum[:])
	key := newKey(t)
	chain, err := newClient(t, ca, fixedToken(tok)).Enroll(ctx, id, key)
	if err != nil {
		t.Fatal(err)
	}
	svid := &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
	enrolled := serialOf(svid)

	// Refusals: the same token again, a token that is none, a SPIFFE ID over the limit.
	if _, err := newClient(t, ca, fixedToken(tok)).Enroll(ctx, id, newKey(t)); responseStatus(err) != http.StatusUnauthorized {
		t.Fatalf("reused token: %v, want 401", err)
	}
	if _, err := newClient(t, ca, fixedToken("not.a.token")).Enroll(ctx, id, newKey(t)); responseStatus(err) != http.StatusUnauthorized {
		t.Fatalf("invalid token: %v, want 401", err)
	}
	long := spiffeid.RequireFromPath(testTD, "/agent/"+strings.Repeat("a", 2048))
	if _, err := RequestToken(ctx, cfg.StateDir, long); responseStatus(err) != http.StatusBadRequest {
		t.Fatalf("token for a %d-byte ID: %v, want 400", len(long.String()), err)
	}

	// A rekey (the client's renewal), then a renewal with the same key.
	rekeyKey := newKey(t)
	rekeyed, err := newClient(t, ca, nil).Renew(ctx, svid, rekeyKey)
	if err != nil {
		t.Fatal(err)
	}
	svid2 := &x509svid.SVID{ID: id, Certificates: rekeyed, PrivateKey: rekeyKey}
	if status, body := do(t, httpsClient(t, ca, tlsCert(svid2)), http.MethodPost, ca.URL()+"/1.0/renew", nil); status != http.StatusCreated {
		t.Fatalf("renew: %d %s", status, body)
	}
	// A renewal the CA refuses: the identity is revoked.
	if _, err := ca.Revoke(ctx, audit.Actor{Initiator: "test"}, meshapi.RevokeRequest{SPIFFEID: id.String(), Reason: "test"}); err != nil {
		t.Fatal(err)
	}
	if _, err := newClient(t, ca, nil).Renew(ctx, svid2, newKey(t)); responseStatus(err) != http.StatusUnauthorized {
		t.Fatalf("renewal of a revoked identity: %v, want 401", err)
	}

	want := []audit.Issuance{
		{Action: audit.ActionToken, Result: audit.IssueOK, Actor: audit.Actor{Initiator: admin}, SPIFFEID: id.String(), TokenID: tokenID},
		{Action: audit.ActionEnroll, Result: audit.IssueOK, Actor: audit.Actor{Initiator: authority.InitiatorToken}, SPIFFEID: id.String(), TokenID: tokenID, Serial: enrolled},
		{Action: audit.ActionEnroll, Result: audit.IssueRefused, Reason: audit.ReasonTokenReused, Actor: audit.Actor{Initiator: authority.InitiatorToken}, SPIFFEID: id.String(), TokenID: tokenID},
		{Action: audit.ActionEnroll, Result: audit.IssueRefused, Reason: audit.ReasonTokenInvalid, Actor: audit.Actor{Initiator: authority.InitiatorToken}},
		{Action: audit.ActionToken, Result: audit.IssueRefused, Reason: audit.ReasonBadRequest, Actor: audit.Actor{Initiator: admin}, SPIFFEID: long.String()},
		{Action: audit.ActionRekey, Result: audit.IssueOK, Actor: audit.Actor{Initiator: id.String(), CallerSerial: enrolled}, SPIFFEID: id.String(), Serial: serialOf(svid2)},
		{Action: audit.ActionRenew, Result: audit.IssueOK, Actor: audit.Actor{Initiator: id.String(), CallerSerial: serialOf(svid2)}, SPIFFEID: id.String()},
		{Action: audit.ActionRekey, Result: audit.IssueRefused, Reason: audit.ReasonCertificateInvalid, Actor: audit.Actor{Initiator: id.String(), CallerSerial: serialOf(svid2)}, SPIFFEID: id.String()},
	}
	got := eventsOf[audit.Issuance](rec)
	if len(got) != len(want) {
		t.Fatalf("%d issuance records, want %d: %+v", len(got), len(want), got)
	}
	for i, w := range want {
		g := got[i]
		if g.Action != w.Action || g.Result != w.Result || g.Reason != w.Reason || g.Initiator != w.Initiator ||
			g.CallerSerial != w.CallerSerial || g.SPIFFEID != w.SPIFFEID || g.TokenID != w.TokenID ||
			(w.Serial != "" && g.Serial != w.Serial) {
			t.Errorf("record %d: %+v\nwant %+v", i, g, w)
		}
		if g.Result == audit.IssueOK && g.Action != audit.ActionToken && (g.Serial == "" || g.NotAfter.IsZero()) {
			t.Errorf("record %d: no serial or not_after for an issued certificate: %+v", i, g)
		}
		if g.Result == audit.IssueRefused && g.Error == "" {
			t.Errorf("record %d: refusal without its message: %+v", i, g)
		}
		if strings.Contains(g.Error, tok) || slices.Contains([]string{g.TokenID, g.Serial}, tok) {
			t.Errorf("record %d holds the token", i)
		}
	}
	if g := got[6]; g.Serial == "" || g.Serial == serialOf(svid2) {
		t.Errorf("renewal record serial %q, want a new one", g.Serial)
	}
	timed := map[[2]string]float64{}
	for _, w := range want {
		timed[[2]string{string(w.Action), string(w.Result)}]++
	}
	for _, action := range []audit.IssueAction{audit.ActionEnroll, audit.ActionRenew, audit.ActionRekey} {
		for _, result := range []audit.IssueResult{audit.IssueOK, audit.IssueRefused, audit.IssueError} {
			got := metrictest.Value(t, reg, metricIssueDuration, labelAction, string(action), labelResult, string(result))
			if want := timed[[2]string{string(action), string(result)}]; got != want {
				t.Errorf("%s{action=%q,result=%q}: %v samples, want %v", metricIssueDuration, action, result, got, want)
			}
		}
	}
}

// TestClientCertificateRules: a client certificate signed by the CA's own
// intermediate that breaks a certificate rule is refused (401) on every HTTPS path,
// and a refused renewal is audited with its caller.
func TestClientCertificateRules(t *testing.T) {
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	cfg.Audit = rec
	ca := startCA(t, cfg)
	id := spiffeid.RequireFromPath(testTD, "/workload/rules")
	mint := func(id spiffeid.ID, eku ...x509.ExtKeyUsage) *x509svid.SVID {
		key := newKey(t).(*ecdsa.PrivateKey)
		serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
		tmpl := &x509.Certificate{
			SerialNumber: serial,
			NotBefore:    time.Now().Add(-time.Minute),
			NotAfter:     time.Now().Add(time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  eku,
			URIs:         []*url.URL{id.URL()},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.auth.Intermediate(), key.Public(), ca.auth.IntermediateSigner())
		if err != nil {
			t.Fatal(err)
		}
		leaf, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{leaf, ca.auth.Intermediate()}, PrivateKey: key}
	}
	both := []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	padded := mint(id, both...)
	padded.Certificates = append(padded.Certificates, ca.auth.Intermediate())
	for _, tc := range []struct {
		name   string
		svid   *x509svid.SVID
		status int
	}{
		{name: "valid", svid: mint(id, both...), status: http.StatusCreated},
		{name: "server_auth_only", svid: mint(id, x509.ExtKeyUsageServerAuth), status: http.StatusUnauthorized},
		{name: "two_intermediates", svid: padded, status: http.StatusUnauthorized},
		{name: "id_2049_bytes", svid: mint(spiffeid.RequireFromString(testTD.IDString()+"/agent/"+strings.Repeat("a", 2049-len(testTD.IDString()+"/agent/"))), both...), status: http.StatusUnauthorized},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(eventsOf[audit.Issuance](rec))
			status, body := do(t, httpsClient(t, ca, tlsCert(tc.svid)), http.MethodPost, ca.URL()+"/1.0/renew", nil)
			if status != tc.status {
				t.Fatalf("renew: %d (%d bytes), want %d", status, len(body), tc.status)
			}
			got := eventsOf[audit.Issuance](rec)[before:]
			if len(got) != 1 || got[0].CallerSerial != serialOf(tc.svid) ||
				(tc.status != http.StatusCreated && got[0].Reason != audit.ReasonCertificateInvalid) {
				t.Fatalf("records %+v, want one for serial %s", got, serialOf(tc.svid))
			}
		})
	}
}
