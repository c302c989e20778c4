package ca

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/metrictest"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"
)

func TestRenewDecision(t *testing.T) {
	t.Parallel()
	host := spiffeid.RequireFromPath(testTD, "/host/h")
	chain := []lineageEntry{{Serial: "1"}, {Serial: "2", Replaced: "1"}, {Serial: "3", Replaced: "2"}}
	fork := []lineageEntry{{Serial: "1"}, {Serial: "2", Replaced: "1"}, {Serial: "3", Replaced: "1"}}
	for _, tc := range []struct {
		name   string
		id     spiffeid.ID
		lin    []lineageEntry
		serial string
		want   renewRefusal
	}{
		{"head", host, chain, "3", ""},
		{"the serial the head replaced (overlap)", host, chain, "2", ""},
		{"older than the overlap", host, chain, "1", refusedFork},
		{"sibling of the head", host, fork, "2", refusedFork},
		{"common parent of the fork", host, fork, "1", ""},
		{"not in the lineage", host, chain, "9", refusedFork},
		{"enrolled head, no overlap", host, []lineageEntry{{Serial: "1"}, {Serial: "2"}}, "1", refusedFork},
		{"no lineage yet (issued before lineages)", host, nil, "5", ""},
		{"agent head", agentX, []lineageEntry{{Serial: "1"}}, "1", refusedAgentRenewal},
		{"agent without lineage", agentX, nil, "1", refusedAgentRenewal},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, ok := renewDecision(tc.id, tc.lin, tc.serial)
			if got != tc.want || ok != (tc.want == "") {
				t.Errorf("renewDecision(%s) = %q, %v; want %q", tc.serial, got, ok, tc.want)
			}
		})
	}
}

// startAuditedCA starts a CA whose audit records the returned recorder keeps.
func startAuditedCA(t *testing.T, reg prometheus.Registerer) (*runningCA, *auditRecorder) {
	t.Helper()
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	cfg.Audit, cfg.Registerer = rec, reg
	return startCA(t, cfg), rec
}

// wantLineageRefusal checks that a lineage refusal with reason was audited for serial.
func wantLineageRefusal(t *testing.T, rec *auditRecorder, caller spiffeid.ID, serial string, reason renewRefusal) {
	t.Helper()
	for _, r := range eventsOf[audit.Lineage](rec) {
		if r.Result == "refused" && r.Caller == caller.String() && r.Serial == serial && r.Reason == string(reason) {
			return
		}
	}
	t.Errorf("no refused lineage record for %s serial %s with reason %s in %+v", caller, serial, reason, eventsOf[audit.Lineage](rec))
}

// A thief who stole S1 (certificate and key) rekeys it to S2 before the owner rotates;
// the owner's rotation from S1 (in overlap) to S3 leaves S2 a fork that cannot renew,
// and the compromise revocation (the lineage except S3) lists S1 and S2 but not S3.
func TestLineageFork(t *testing.T) {
	reg := prometheus.NewRegistry()
	ca, rec := startAuditedCA(t, reg)
	ctx := context.Background()
	cc := meshclient.ClientConfig{URL: ca.URL(), Roots: ca.Roots()}
	client := newClient(t, ca, nil)
	id := spiffeid.RequireFromPath(testTD, "/host/owner")
	renew := func(from *x509svid.SVID) (*x509svid.SVID, error) {
		key := newKey(t)
		chain, err := client.Renew(ctx, from, key)
		if err != nil {
			return nil, err
		}
		return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}, nil
	}
	mustRenew := func(from *x509svid.SVID) *x509svid.SVID {
		t.Helper()
		s, err := renew(from)
		if err != nil {
			t.Fatalf("Renew of %s: %v", serialOf(from), err)
		}
		return s
	}
	s1 := enroll(t, ca, id)
	s2 := mustRenew(s1) // the thief, with the stolen key of S1
	s3 := mustRenew(s1) // the owner's compromise rotation: S1 is in overlap
	_, err := renew(s2)
	if responseStatus(err) != http.StatusForbidden || !permanent(err) {
		t.Fatalf("Renew of the fork S2: %v, want a permanent 403", err)
	}
	wantLineageRefusal(t, rec, id, serialOf(s2), refusedFork)
	if got := metrictest.Value(t, reg, metricLineageRefused, labelReason, string(refusedFork)); got != 1 {
		t.Errorf("fork refusals counted %v, want 1", got)
	}

	// Only the identity itself, presenting the kept certificate, may ask.
	neighbour := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/host/neighbour"))
	for name, tc := range map[string]struct {
		cert *x509svid.SVID
		req  meshapi.RevokeRequest
	}{
		"another identity":            {neighbour, meshapi.RevokeRequest{SPIFFEID: id.String(), Except: serialOf(s3), Reason: "r"}},
		"keeping another certificate": {s3, meshapi.RevokeRequest{SPIFFEID: id.String(), Except: serialOf(s1), Reason: "r"}},
	} {
		if _, err := meshclient.RevokeRemote(ctx, cc, *tlsCert(tc.cert), tc.req); responseStatus(err) != http.StatusForbidden {
			t.Errorf("%s: RevokeRemote = %v, want 403", name, err)
		}
	}
	res, err := meshclient.RevokeRemote(ctx, cc, *tlsCert(s3), meshapi.RevokeRequest{SPIFFEID: id.String(), Except: serialOf(s3), Reason: "key-compromise"})
	if err != nil {
		t.Fatalf("revoking the lineage except S3: %v", err)
	}
	want := []string{serialOf(s1), serialOf(s2)}
	slices.Sort(want)
	got := slices.Sorted(slices.Values(res.Serials))
	if !slices.Equal(got, want) {
		t.Errorf("revoked %v, want S1 and S2 %v", got, want)
	}
	l, _ := servedDenyList(t, ca, httpsClient(t, ca, tlsCert(neighbour)))
	if !l.Denies(id, serialOf(s1), time.Time{}) || !l.Denies(id, serialOf(s2), time.Time{}) || l.Denies(id, serialOf(s3), time.Time{}) {
		t.Errorf("deny list %+v: want S1 and S2, not S3", l)
	}
	if r := rec.last(t); r.Result != "ok" || r.Initiator != id.String() || !slices.Equal(slices.Sorted(slices.Values(r.Serials)), want) {
		t.Errorf("revocation record %+v", r)
	}
	// S2 is revoked in step-ca now too, and still refused and audited as revoked.
	if _, err := renew(s2); responseStatus(err) != http.StatusForbidden {
		t.Errorf("Renew of the revoked fork: %v, want 403", err)
	}
	wantLineageRefusal(t, rec, id, serialOf(s2), refusedRevokedSerial)
	if _, err := renew(s1); responseStatus(err) != http.StatusForbidden {
		t.Errorf("Renew of the revoked S1: %v, want 403", err)
	}
	// The owner goes on renewing from S3.
	s4 := mustRenew(s3)
	mustRenew(s4)
	// S3 is no longer the head: keeping it is refused (another holder renewed after it).
	_, err = meshclient.RevokeRemote(ctx, cc, *tlsCert(s3), meshapi.RevokeRequest{SPIFFEID: id.String(), Except: serialOf(s3), Reason: "r"})
	if responseStatus(err) != http.StatusConflict {
		t.Errorf("lineage revocation keeping a non-head: %v, want 409", err)
	}
	if _, err := ca.Revoke(ctx, audit.Actor{Initiator: "uid:0"}, meshapi.RevokeRequest{SPIFFEID: id.String(), Except: serialOf(s3), Reason: "r"}); !errors.Is(err, ErrNotLineageHead) {
		t.Errorf("Revoke keeping a non-head: %v, want ErrNotLineageHead", err)
	}
}

// An agent moved to another host: its old host can neither renew the certificate it
// holds nor enrol with a token granted before the move, and the move puts every
// certificate issued to the old host on the deny-list.
func TestLineageMovedAgent(t *testing.T) {
	ca, rec := startAuditedCA(t, nil)
	ctx := context.Background()
	hostA := agentDirectory(t, ca, enroll(t, ca, idA))
	hostB := agentDirectory(t, ca, enroll(t, ca, idB))
	if err := ca.RegisterEntry(ctx, audit.Actor{Initiator: "op"}, meshapi.Entry{ID: agentX, Host: idA, UID: 1000}); err != nil {
		t.Fatal(err)
	}
	enrolWith := func(tok string) (*x509svid.SVID, error) {
		key := newKey(t)
		chain, err := newClient(t, ca, fixedToken(tok)).Enroll(ctx, agentX, key)
		if err != nil {
			return nil, err
		}
		return &x509svid.SVID{ID: agentX, Certificates: chain, PrivateKey: key}, nil
	}
	token := func(d *meshclient.Member) string {
		t.Helper()
		tok, err := d.Tokens.AgentToken(ctx, agentX)
		if err != nil {
			t.Fatalf("AgentToken: %v", err)
		}
		return tok
	}
	onA, err := enrolWith(token(hostA))
	if err != nil {
		t.Fatalf("Enroll on host a: %v", err)
	}
	stale := token(hostA) // granted before the move, used after it
	if lin, err := ca.db.lin.lineage(agentX); err != nil || len(lin) != 1 || lin[0].Host != idA {
		t.Fatalf("lineage %+v (%v), want one certificate issued to %s", lin, err, idA)
	}
	// Agents re-enrol through their host; their certificates never renew themselves.
	if _, err := newClient(t, ca, nil).Renew(ctx, onA, newKey(t)); responseStatus(err) != http.StatusForbidden {
		t.Errorf("Renew of an agent certificate: %v, want 403", err)
	}
	wantLineageRefusal(t, rec, agentX, serialOf(onA), refusedAgentRenewal)

	if _, err := ca.UnregisterEntry(ctx, audit.Actor{Initiator: "op"}, agentX); err != nil {
		t.Fatal(err)
	}
	if err := ca.RegisterEntry(ctx, audit.Actor{Initiator: "op"}, meshapi.Entry{ID: agentX, Host: idB, UID: 1000}); err != nil {
		t.Fatalf("register on host b: %v", err)
	}
	l, _ := servedDenyList(t, ca, httpsClient(t, ca, tlsCert(onA)))
	if !l.Denies(agentX, serialOf(onA), time.Time{}) || l.Denies(agentX, "", time.Time{}) {
		t.Errorf("deny list %+v: want host a's serial %s, not the identity", l, serialOf(onA))
	}
	if r := rec.last(t); r.Result != "ok" || r.SPIFFEID != agentX.String() || !slices.Equal(r.Serials, []string{serialOf(onA)}) {
		t.Errorf("revocation record %+v", r)
	}
	if _, err := enrolWith(stale); responseStatus(err) != http.StatusForbidden {
		t.Errorf("Enroll with host a's token after the move: %v, want 403", err)
	}
	found := false
	for _, r := range eventsOf[audit.Lineage](rec) {
		found = found || (r.Op == "sign" && r.Host == idA.String() && r.Reason == string(refusedNotRegisteredHost))
	}
	if !found {
		t.Errorf("no refused sign record for host a: %+v", eventsOf[audit.Lineage](rec))
	}
	if _, err := hostA.Tokens.AgentToken(ctx, agentX); responseStatus(err) != http.StatusForbidden {
		t.Errorf("AgentToken by host a after the move: %v, want 403", err)
	}
	onB, err := enrolWith(token(hostB))
	if err != nil {
		t.Fatalf("Enroll on host b: %v", err)
	}
	// A compromise rotation of the agent (a fresh enrolment through host b) revokes the
	// rest of its lineage with its new certificate.
	fresh, err := enrolWith(token(hostB))
	if err != nil {
		t.Fatalf("Enroll on host b again: %v", err)
	}
	cc := meshclient.ClientConfig{URL: ca.URL(), Roots: ca.Roots()}
	res, err := meshclient.RevokeRemote(ctx, cc, *tlsCert(fresh), meshapi.RevokeRequest{SPIFFEID: agentX.String(), Except: serialOf(fresh), Reason: "key-compromise"})
	// Host a's certificate, revoked already, is covered again; nothing changes for it.
	if err != nil || !slices.Equal(slices.Sorted(slices.Values(res.Serials)), slices.Sorted(slices.Values([]string{serialOf(onA), serialOf(onB)}))) {
		t.Fatalf("agent lineage revocation: %+v, %v; want %s and %s", res, err, serialOf(onA), serialOf(onB))
	}
	onB = fresh
	// Registering again to the same host revokes nothing of it.
	if _, err := ca.UnregisterEntry(ctx, audit.Actor{Initiator: "op"}, agentX); err != nil {
		t.Fatal(err)
	}
	if err := ca.RegisterEntry(ctx, audit.Actor{Initiator: "op"}, meshapi.Entry{ID: agentX, Host: idB, UID: 1000}); err != nil {
		t.Fatal(err)
	}
	if l, _ := servedDenyList(t, ca, httpsClient(t, ca, tlsCert(onB))); l.Denies(agentX, serialOf(onB), time.Time{}) {
		t.Errorf("re-registration to the same host revoked its certificate %s", serialOf(onB))
	}
}
