package ca

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// step-ca's revoke routes land on the deny-list for the certificate's holder and are
// refused, naming agentmesh revoke, for anything else; every request is audited.
func TestStepRevokeRoutes(t *testing.T) {
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	cfg.Audit = rec
	ca := startCA(t, cfg)
	holder := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/host/s"))
	other := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/host/o"))
	serial := serialOf(holder)
	body := func(serial, ott string) map[string]any {
		return map[string]any{"serial": serial, "ott": ott, "reasonCode": 1, "reason": "key compromise", "passive": true}
	}

	refusals := []struct {
		name   string
		hc     *http.Client
		path   string
		body   map[string]any
		status int
	}{
		{"another certificate's serial", httpsClient(t, ca, tlsCert(other)), "/1.0/revoke", body(serial, ""), http.StatusForbidden},
		{"a one-time token", httpsClient(t, ca, tlsCert(other)), "/revoke", body(serial, "a.b.c"), http.StatusForbidden},
		{"no client certificate", httpsClient(t, ca, nil), "/1.0/revoke", body(serial, ""), http.StatusUnauthorized},
	}
	for _, tc := range refusals {
		before := len(rec.revocations())
		status, answer := do(t, tc.hc, http.MethodPost, ca.URL()+tc.path, tc.body)
		if status != tc.status || !strings.Contains(string(answer), "agentmesh revoke") {
			t.Errorf("%s: %d %s, want %d naming agentmesh revoke", tc.name, status, answer, tc.status)
		}
		recs := rec.revocations()
		if len(recs) != before+1 || recs[len(recs)-1].Via != viaStepCA || recs[len(recs)-1].Result != "refused" {
			t.Errorf("%s: audited as %+v", tc.name, recs[before:])
		}
	}
	if l, _ := servedDenyList(t, ca, httpsClient(t, ca, tlsCert(other))); l.Version != 1 {
		t.Fatalf("a refused step-ca revocation published version %d", l.Version)
	}

	status, answer := do(t, httpsClient(t, ca, tlsCert(holder)), http.MethodPost, ca.URL()+"/1.0/revoke", body(serial, ""))
	var ok struct {
		Status string `json:"status"`
	}
	if status != http.StatusOK || json.Unmarshal(answer, &ok) != nil || ok.Status != "ok" {
		t.Fatalf("the holder's step-ca revocation: %d %s", status, answer)
	}
	l, _ := servedDenyList(t, ca, httpsClient(t, ca, tlsCert(other)))
	if l.Version != 2 || !l.Denies(holder.ID, serial, holder.Certificates[0].NotBefore) || l.Denies(other.ID, serialOf(other), other.Certificates[0].NotBefore) {
		t.Errorf("list after the step-ca revocation: %+v", l)
	}
	if r := rec.last(t); r.Via != viaStepCA || r.Result != "ok" || r.Initiator != holder.ID.String() || r.Serial != serial || r.Reason != "key compromise" {
		t.Errorf("audited as %+v", r)
	}
}
