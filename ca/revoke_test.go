package ca

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"
)

// auditRecorder is a Config.Audit that keeps the records in memory.
type auditRecorder struct {
	mu     sync.Mutex
	events []audit.Event
}

func (r *auditRecorder) Append(e audit.Event) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, e)
	return nil
}

func (r *auditRecorder) revocations() []audit.Revocation {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []audit.Revocation
	for _, e := range r.events {
		if rev, ok := e.(audit.Revocation); ok {
			out = append(out, rev)
		}
	}
	return out
}

func (r *auditRecorder) last(t *testing.T) audit.Revocation {
	t.Helper()
	recs := r.revocations()
	if len(recs) == 0 {
		t.Fatal("no revocation audit record")
	}
	return recs[len(recs)-1]
}

// parkedHook makes the registry signal each long-poll that starts waiting.
func parkedHook(parked chan struct{}) func(*Server) {
	return func(s *Server) {
		s.dir.testHookWaiting = func() {
			select {
			case parked <- struct{}{}:
			default:
			}
		}
	}
}

func serialOf(svid *x509svid.SVID) string { return svid.Certificates[0].SerialNumber.String() }

// servedDenyList fetches GET /mesh/v1/revocations with hc and verifies it against the
// CA's root.
func servedDenyList(t *testing.T, ca *runningCA, hc *http.Client) (*meshapi.DenyList, *meshapi.SignedDenyList) {
	t.Helper()
	status, body := do(t, hc, http.MethodGet, ca.URL()+meshapi.Prefix+meshapi.RevocationsPath, nil)
	if status != http.StatusOK {
		t.Fatalf("GET revocations: %d %s", status, body)
	}
	signed := decodeJSON[meshapi.SignedDenyList](t, body)
	l, err := meshapi.VerifyDenyList(&signed, testTD, ca.Roots(), time.Now())
	if err != nil {
		t.Fatalf("served deny list: %v", err)
	}
	return l, &signed
}

// crlSerials fetches step-ca's CRL, checks it is signed by the intermediate, and
// returns its serials.
func crlSerials(t *testing.T, ca *runningCA, intermediate *x509.Certificate) []string {
	t.Helper()
	status, der := do(t, httpsClient(t, ca, nil), http.MethodGet, ca.URL()+"/1.0/crl", nil)
	if status != http.StatusOK {
		t.Fatalf("GET /1.0/crl: %d %s", status, der)
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		t.Fatalf("parse CRL: %v", err)
	}
	if err := crl.CheckSignatureFrom(intermediate); err != nil {
		t.Fatalf("CRL not signed by the intermediate: %v", err)
	}
	var out []string
	for _, e := range crl.RevokedCertificateEntries {
		out = append(out, e.SerialNumber.String())
	}
	return out
}

// Revoking an identity end to end on a real CA: enforcement (tokens, enrolment with a
// token handed out before, renewal and rekey, registration), the signed list served
// and pushed to a parked long-poll at once, the directory entry removed, the CRL, the
// audit record, and idempotence.
func TestRevokeIdentity(t *testing.T) {
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	cfg.Audit = rec
	parked := make(chan struct{}, 1)
	ca := startCAWith(t, cfg, parkedHook(parked))
	ctx := context.Background()

	id := spiffeid.RequireFromPath(testTD, "/host/r")
	first := enroll(t, ca, id)
	client := newClient(t, ca, nil)
	key := newKey(t)
	chain, err := client.Renew(ctx, first, key)
	if err != nil {
		t.Fatal(err)
	}
	second := &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
	earlyToken, err := ca.Token(id) // handed out before the revocation
	if err != nil {
		t.Fatal(err)
	}
	other := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/host/o"))
	hcOther := httpsClient(t, ca, tlsCert(other))
	hcRevoked := httpsClient(t, ca, tlsCert(second))
	regURL := ca.URL() + meshapi.Prefix + meshapi.RegisterPath
	dirURL := ca.URL() + meshapi.Prefix + meshapi.DirectoryPath
	for i, hc := range []*http.Client{hcRevoked, hcOther} {
		if status, body := do(t, hc, http.MethodPost, regURL, registerBody(15008, "10.0.1."+strconv.Itoa(i+1))); status != http.StatusOK {
			t.Fatalf("register: %d %s", status, body)
		}
	}

	v1, _ := servedDenyList(t, ca, hcOther)
	if v1.Version != 1 || len(v1.IDs)+len(v1.Serials) != 0 {
		t.Fatalf("first list: version %d with %d ids, %d serials; want version 1, empty", v1.Version, len(v1.IDs), len(v1.Serials))
	}
	_, body := do(t, hcOther, http.MethodGet, dirURL+"?wait=0s", nil)
	doc0 := decodeJSON[meshapi.DirectoryDocument](t, body)
	if doc0.Revocations == nil || len(doc0.Peers) != 2 {
		t.Fatalf("directory before: %d peers, revocations %v", len(doc0.Peers), doc0.Revocations)
	}

	type answer struct {
		doc     meshapi.DirectoryDocument
		elapsed time.Duration
	}
	answers := make(chan answer, 1)
	select { // drop a stray signal, if any
	case <-parked:
	default:
	}
	go func() { // no t.Fatal here: not the test's goroutine
		start := time.Now()
		var doc meshapi.DirectoryDocument
		resp, err := hcOther.Get(dirURL + "?since=" + strconv.FormatUint(doc0.Version, 10) + "&wait=20s")
		if err == nil {
			err = json.NewDecoder(resp.Body).Decode(&doc)
			_ = resp.Body.Close()
		}
		if err != nil {
			t.Errorf("long-poll: %v", err)
		}
		answers <- answer{doc, time.Since(start)}
	}()
	<-parked

	res, err := RequestRevoke(ctx, cfg.StateDir, meshapi.RevokeRequest{SPIFFEID: id.String(), Reason: "key compromise"})
	if err != nil {
		t.Fatalf("RequestRevoke: %v", err)
	}
	wantSerials := []string{serialOf(first), serialOf(second)}
	slices.SortFunc(wantSerials, meshapi.CompareSerials)
	if res.ListVersion != 2 || !slices.Equal(res.Serials, wantSerials) {
		t.Fatalf("RequestRevoke = %+v, want version 2 with serials %v", res, wantSerials)
	}

	t.Run("watchers are woken with the new list, the entry removed", func(t *testing.T) {
		a := <-answers
		if a.elapsed >= 20*time.Second || a.doc.Version <= doc0.Version || a.doc.Revocations == nil {
			t.Fatalf("long-poll answered version %d after %v (revocations %v)", a.doc.Version, a.elapsed, a.doc.Revocations)
		}
		t.Logf("long-poll woken %v after it started", a.elapsed)
		l, err := meshapi.VerifyDenyList(a.doc.Revocations, testTD, ca.Roots(), time.Now())
		if err != nil {
			t.Fatalf("pushed list: %v", err)
		}
		if l.Version != 2 || !l.Denies(id, "1", time.Time{}) || !l.Denies(spiffeid.ID{}, serialOf(first), time.Time{}) || l.Denies(other.ID, serialOf(other), time.Time{}) {
			t.Errorf("pushed list %+v", l)
		}
		if ok, err := meshapi.NextDenyList(v1, l, time.Now()); !ok || err != nil {
			t.Errorf("meshapi.NextDenyList(v1, v2, time.Now()) = %v, %v", ok, err)
		}
		if ids := peerIDs(a.doc); !slices.Equal(ids, []string{other.ID.String()}) {
			t.Errorf("peers after the revocation: %v", ids)
		}
		served, signed := servedDenyList(t, ca, hcRevoked) // a revoked SVID may still read it
		if !meshapi.SameDenyList(served, l) {
			t.Error("GET /revocations serves another list than the directory")
		}
		if !slices.Equal(signed.Signer, first.Certificates[1].Raw) {
			t.Error("the list is not signed by the CA's intermediate (whose key is in the token)")
		}
		if e := l.IDs[0]; e.SPIFFEID != id || e.Reason != "key compromise" || e.Version != 2 || e.RevokedAt.IsZero() {
			t.Errorf("id entry %+v", e)
		}
		for _, e := range l.Serials {
			if e.SPIFFEID != id || e.NotAfter.IsZero() || e.Version != 2 {
				t.Errorf("serial entry %+v", e)
			}
		}
	})

	t.Run("no token, no enrolment, no renewal, no registration", func(t *testing.T) {
		if _, err := ca.Token(id); !errors.Is(err, ErrRevoked) {
			t.Errorf("Token: %v, want ErrRevoked", err)
		}
		var re *meshapi.ResponseError
		if _, err := RequestToken(ctx, cfg.StateDir, id); !errors.As(err, &re) || re.Status != http.StatusForbidden {
			t.Errorf("RequestToken: %v, want 403", err)
		}
		if _, err := newClient(t, ca, fixedToken(earlyToken)).Enroll(ctx, id, newKey(t)); !permanent(err) {
			t.Errorf("Enroll with a token from before the revocation: %v, want a permanent error", err)
		}
		for name, svid := range map[string]*x509svid.SVID{"first": first, "second": second} {
			if _, err := client.Renew(ctx, svid, newKey(t)); !permanent(err) {
				t.Errorf("rekey of the %s certificate: %v, want a permanent error", name, err)
			}
			status, body := do(t, httpsClient(t, ca, tlsCert(svid)), http.MethodPost, ca.URL()+"/1.0/renew", nil)
			if status != http.StatusUnauthorized && status != http.StatusForbidden {
				t.Errorf("renew of the %s certificate: %d %s, want 401 or 403", name, status, body)
			}
		}
		if status, body := do(t, hcRevoked, http.MethodPost, regURL, registerBody(15008, "10.0.1.1")); status != http.StatusForbidden {
			t.Errorf("register after revocation: %d %s, want 403", status, body)
		}
		// The last line of defence: a certificate for the identity cannot be stored.
		if err := ca.db.StoreCertificateChain(nil, first.Certificates...); !errors.Is(err, ErrRevoked) {
			t.Errorf("storing a certificate of a revoked identity: %v, want ErrRevoked", err)
		}
		if _, err := client.Renew(ctx, other, newKey(t)); err != nil {
			t.Errorf("rekey of another identity: %v", err)
		}
	})

	t.Run("both serials are in the HSM-signed CRL", func(t *testing.T) {
		got := crlSerials(t, ca, first.Certificates[1])
		for _, s := range wantSerials {
			if !slices.Contains(got, s) {
				t.Errorf("CRL %v lacks %s", got, s)
			}
		}
		if slices.Contains(got, serialOf(other)) {
			t.Errorf("CRL lists the other host")
		}
	})

	t.Run("revoking again changes nothing", func(t *testing.T) {
		before, err := RequestDirectory(ctx, cfg.StateDir)
		if err != nil {
			t.Fatal(err)
		}
		again, err := ca.Revoke(ctx, audit.Actor{Initiator: "operator"}, meshapi.RevokeRequest{SPIFFEID: id.String(), Reason: "again"})
		if err != nil || again.ListVersion != 2 || !slices.Equal(again.Serials, wantSerials) {
			t.Fatalf("second Revoke = %+v, %v; want version 2, same serials", again, err)
		}
		after, err := RequestDirectory(ctx, cfg.StateDir)
		if err != nil {
			t.Fatal(err)
		}
		if after.Version != before.Version {
			t.Errorf("directory version moved %d -> %d on an idempotent revocation", before.Version, after.Version)
		}
		l, _ := servedDenyList(t, ca, hcOther)
		if l.Version != 2 || l.IDs[0].Reason != "key compromise" {
			t.Errorf("list after an idempotent revocation: version %d, reason %q", l.Version, l.IDs[0].Reason)
		}
	})

	t.Run("audit records", func(t *testing.T) {
		recs := rec.revocations()
		if len(recs) != 2 {
			t.Fatalf("%d audit records, want 2: %+v", len(recs), recs)
		}
		want := audit.Revocation{Actor: audit.PeerUIDActor(os.Getuid()), SPIFFEID: id.String(), Reason: "key compromise",
			Result: "ok", Serials: wantSerials, ListVersion: 2}
		if r := recs[0]; r.Initiator != want.Initiator || r.SPIFFEID != want.SPIFFEID || r.Reason != want.Reason ||
			r.Result != want.Result || !slices.Equal(r.Serials, want.Serials) || r.ListVersion != want.ListVersion {
			t.Errorf("audit record %+v, want %+v", r, want)
		}
		if r := recs[1]; r.Initiator != "operator" || r.Result != "ok" || r.ListVersion != 2 {
			t.Errorf("idempotent audit record %+v", r)
		}
	})
}

// Revoking one certificate: only that serial is denied, the identity keeps working;
// unknown serials are 404 and malformed requests 400, all audited as refused.
func TestRevokeSerial(t *testing.T) {
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	cfg.Audit = rec
	ca := startCA(t, cfg)
	ctx := context.Background()
	id := spiffeid.RequireFromPath(testTD, "/workload/s")
	lost := enroll(t, ca, id)
	kept := enroll(t, ca, id)

	res, err := ca.Revoke(ctx, audit.Actor{Initiator: "spiffe://mesh.test/admin/op"}, meshapi.RevokeRequest{Serial: serialOf(lost), Reason: "laptop lost"})
	if err != nil || res.ListVersion != 2 || !slices.Equal(res.Serials, []string{serialOf(lost)}) {
		t.Fatalf("Revoke = %+v, %v", res, err)
	}
	l, _ := servedDenyList(t, ca, httpsClient(t, ca, tlsCert(kept)))
	if len(l.IDs) != 0 || len(l.Serials) != 1 || !l.Denies(spiffeid.ID{}, serialOf(lost), time.Time{}) || l.Denies(id, serialOf(kept), time.Time{}) {
		t.Fatalf("list %+v", l)
	}
	if e := l.Serials[0]; e.SPIFFEID != id || !e.NotAfter.Equal(lost.Certificates[0].NotAfter) || e.Reason != "laptop lost" {
		t.Errorf("serial entry %+v", e)
	}
	client := newClient(t, ca, nil)
	if _, err := client.Renew(ctx, lost, newKey(t)); !permanent(err) {
		t.Errorf("rekey of the revoked certificate: %v, want a permanent error", err)
	}
	if _, err := client.Renew(ctx, kept, newKey(t)); err != nil {
		t.Errorf("rekey of the other certificate of the identity: %v", err)
	}
	if _, err := ca.Token(id); err != nil {
		t.Errorf("Token for an identity with one revoked certificate: %v", err)
	}
	if got := crlSerials(t, ca, lost.Certificates[1]); !slices.Equal(got, []string{serialOf(lost)}) {
		t.Errorf("CRL serials %v, want %s", got, serialOf(lost))
	}
	if again, err := ca.Revoke(ctx, audit.Actor{Initiator: "op"}, meshapi.RevokeRequest{Serial: serialOf(lost), Reason: "again"}); err != nil || again.ListVersion != 2 {
		t.Errorf("second Revoke = %+v, %v; want version 2", again, err)
	}

	for _, tc := range []struct {
		name   string
		req    meshapi.RevokeRequest
		status int
		want   error
	}{
		{"unknown serial", meshapi.RevokeRequest{Serial: "12345", Reason: "r"}, http.StatusNotFound, ErrUnknownSerial},
		{"both", meshapi.RevokeRequest{SPIFFEID: id.String(), Serial: serialOf(kept), Reason: "r"}, http.StatusBadRequest, ErrInvalidRequest},
		{"neither", meshapi.RevokeRequest{Reason: "r"}, http.StatusBadRequest, ErrInvalidRequest},
		{"no reason", meshapi.RevokeRequest{SPIFFEID: id.String()}, http.StatusBadRequest, ErrInvalidRequest},
		{"reason not printable", meshapi.RevokeRequest{SPIFFEID: id.String(), Reason: "a\nb"}, http.StatusBadRequest, ErrInvalidRequest},
		{"reason too long", meshapi.RevokeRequest{SPIFFEID: id.String(), Reason: string(make([]byte, 257))}, http.StatusBadRequest, ErrInvalidRequest},
		{"hex serial", meshapi.RevokeRequest{Serial: "0x1f", Reason: "r"}, http.StatusBadRequest, ErrInvalidRequest},
		{"foreign id", meshapi.RevokeRequest{SPIFFEID: "spiffe://other.test/host/a", Reason: "r"}, http.StatusBadRequest, ErrInvalidID},
		{"trust domain id", meshapi.RevokeRequest{SPIFFEID: "spiffe://mesh.test", Reason: "r"}, http.StatusBadRequest, ErrInvalidID},
		{"not an id", meshapi.RevokeRequest{SPIFFEID: "host/a", Reason: "r"}, http.StatusBadRequest, ErrInvalidID},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := RequestRevoke(ctx, cfg.StateDir, tc.req)
			var re *meshapi.ResponseError
			if !errors.As(err, &re) || re.Status != tc.status || re.Op != "revoke" {
				t.Fatalf("RequestRevoke: %v, want %d", err, tc.status)
			}
			if r := rec.last(t); r.Result != "refused" || r.Error == "" {
				t.Errorf("audit record %+v, want refused", r)
			}
			if _, err := ca.Revoke(ctx, audit.Actor{Initiator: "test"}, tc.req); !errors.Is(err, tc.want) {
				t.Errorf("Revoke: %v, want %v", err, tc.want)
			}
		})
	}
	if l, _ := servedDenyList(t, ca, httpsClient(t, ca, tlsCert(kept))); l.Version != 2 {
		t.Errorf("refused requests moved the list to version %d", l.Version)
	}
}

// Only operator (/admin/*) SVIDs may revoke over mTLS; others get 403 and an audit
// record; a revoked operator can no longer revoke.
func TestMeshRevokeAuthorization(t *testing.T) {
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	cfg.Audit = rec
	ca := startCA(t, cfg)
	ctx := context.Background()
	agent := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/agent/x"))
	host := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/host/h"))
	admin := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/admin/alice"))
	victim := spiffeid.RequireFromPath(testTD, "/host/victim")
	cc := meshclient.ClientConfig{URL: ca.URL(), Roots: ca.Roots()}
	req := meshapi.RevokeRequest{SPIFFEID: victim.String(), Reason: "decommissioned"}

	for _, caller := range []*x509svid.SVID{agent, host} {
		_, err := meshclient.RevokeRemote(ctx, cc, *tlsCert(caller), req)
		var re *meshapi.ResponseError
		if !errors.As(err, &re) || re.Status != http.StatusForbidden || re.Op != "revoke" || !re.Permanent() {
			t.Fatalf("RevokeRemote as %s: %v, want a permanent 403", caller.ID, err)
		}
		if r := rec.last(t); r.Result != "refused" || r.Initiator != caller.ID.String() {
			t.Errorf("audit record %+v, want refused by %s", r, caller.ID)
		}
	}
	if _, err := meshclient.RevokeRemote(ctx, cc, *foreignSVID(t, testTD, "/admin/alice"), req); !permanent(err) {
		t.Errorf("RevokeRemote with a foreign CA's admin SVID: %v, want a permanent error", err)
	}
	if l, _ := servedDenyList(t, ca, httpsClient(t, ca, tlsCert(agent))); l.Version != 1 {
		t.Fatalf("refused requests moved the list to version %d", l.Version)
	}

	res, err := meshclient.RevokeRemote(ctx, cc, *tlsCert(admin), req)
	if err != nil || res.ListVersion != 2 || len(res.Serials) != 0 {
		t.Fatalf("RevokeRemote as admin = %+v, %v; want version 2, no serials (never enrolled)", res, err)
	}
	if r := rec.last(t); r.Result != "ok" || r.Initiator != admin.ID.String() || r.SPIFFEID != victim.String() || r.ListVersion != 2 {
		t.Errorf("audit record %+v", r)
	}
	if _, err := ca.Token(victim); !errors.Is(err, ErrRevoked) {
		t.Errorf("Token for an identity revoked before its enrolment: %v", err)
	}
	var re *meshapi.ResponseError
	if _, err := meshclient.RevokeRemote(ctx, cc, *tlsCert(admin), meshapi.RevokeRequest{Reason: "r"}); !errors.As(err, &re) || re.Status != http.StatusBadRequest {
		t.Errorf("RevokeRemote of nothing: %v, want 400", err)
	}

	// An operator revoked (here by itself) can no longer revoke.
	if _, err := meshclient.RevokeRemote(ctx, cc, *tlsCert(admin), meshapi.RevokeRequest{SPIFFEID: admin.ID.String(), Reason: "leaving"}); err != nil {
		t.Fatalf("self-revocation: %v", err)
	}
	if _, err := meshclient.RevokeRemote(ctx, cc, *tlsCert(admin), meshapi.RevokeRequest{SPIFFEID: host.ID.String(), Reason: "r"}); !errors.As(err, &re) || re.Status != http.StatusForbidden {
		t.Errorf("RevokeRemote by a revoked operator: %v, want 403", err)
	}
	if r := rec.last(t); r.Result != "refused" || r.Initiator != admin.ID.String() {
		t.Errorf("audit record %+v", r)
	}
}

// The deny-list survives a restart byte for byte (never re-signed); a revocation
// before Run is published at once and revoked in step-ca when Run starts.
func TestRevocationsSurviveRestart(t *testing.T) {
	cfg, _ := testConfig(t)
	first := startCA(t, cfg)
	ctx := context.Background()
	id := spiffeid.RequireFromPath(testTD, "/host/p")
	revoked := enroll(t, first, id)
	later := enroll(t, first, spiffeid.RequireFromPath(testTD, "/agent/l"))
	if _, err := first.Revoke(ctx, audit.Actor{Initiator: "op"}, meshapi.RevokeRequest{SPIFFEID: id.String(), Reason: "r"}); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(cfg.StateDir, fileDenyList)
	persisted, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("%s: %v, mode %v; want 0644", fileDenyList, err, fi.Mode().Perm())
	}
	if err := first.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}

	var beforeRun *meshapi.DenyList
	second := startCAWith(t, cfg, func(s *Server) {
		st := s.deny.Load()
		if string(st.encoded) != string(persisted) || st.list.Version != 2 {
			t.Fatalf("after restart: version %d, same bytes %v", st.list.Version, string(st.encoded) == string(persisted))
		}
		// Not running yet: listed and published now, revoked in step-ca by Run.
		res, err := s.Revoke(ctx, audit.Actor{Initiator: "op"}, meshapi.RevokeRequest{Serial: serialOf(later), Reason: "before run"})
		if err != nil || res.ListVersion != 3 {
			t.Fatalf("Revoke before Run = %+v, %v", res, err)
		}
		beforeRun = s.deny.Load().list
	})
	l, signed := servedDenyList(t, second, httpsClient(t, second, tlsCert(later)))
	if l.Version != 3 || !meshapi.SameDenyList(l, beforeRun) || !l.Denies(id, "", time.Time{}) || !l.Denies(spiffeid.ID{}, serialOf(later), time.Time{}) {
		t.Fatalf("served after restart: %+v", l)
	}
	var v2 meshapi.SignedDenyList
	if err := json.Unmarshal(persisted, &v2); err != nil {
		t.Fatal(err)
	}
	old, err := meshapi.VerifyDenyList(&v2, testTD, second.Roots(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := meshapi.NextDenyList(old, l, time.Now()); !ok || err != nil {
		t.Errorf("meshapi.NextDenyList(v2 before restart, v3 after, time.Now()) = %v, %v", ok, err)
	}
	onDisk, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if fromDisk := decodeJSON[meshapi.SignedDenyList](t, onDisk); string(fromDisk.Payload) != string(signed.Payload) {
		t.Error("the served list is not the persisted one")
	}
	if _, err := second.Token(id); !errors.Is(err, ErrRevoked) {
		t.Errorf("Token after restart: %v, want ErrRevoked", err)
	}
	crl := crlSerials(t, second, revoked.Certificates[1])
	for _, s := range []string{serialOf(revoked), serialOf(later)} {
		if !slices.Contains(crl, s) {
			t.Errorf("CRL %v lacks %s", crl, s)
		}
	}
}

// Concurrent revocations are serialised: each gets its own version, none is lost.
func TestConcurrentRevocations(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	const n = 6
	versions := make(chan uint64, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			id := spiffeid.RequireFromPath(testTD, "/host/c"+strconv.Itoa(i))
			res, err := ca.Revoke(context.Background(), audit.Actor{Initiator: "op"}, meshapi.RevokeRequest{SPIFFEID: id.String(), Reason: "r"})
			if err != nil {
				t.Errorf("Revoke %s: %v", id, err)
				return
			}
			versions <- res.ListVersion
		})
	}
	wg.Wait()
	close(versions)
	var got []uint64
	for v := range versions {
		got = append(got, v)
	}
	slices.Sort(got)
	if want := []uint64{2, 3, 4, 5, 6, 7}; !slices.Equal(got, want) {
		t.Errorf("versions %v, want %v", got, want)
	}
	l, _ := servedDenyList(t, ca, httpsClient(t, ca, tlsCert(enroll(t, ca, spiffeid.RequireFromPath(testTD, "/agent/r")))))
	if l.Version != n+1 || len(l.IDs) != n {
		t.Errorf("list version %d with %d ids, want %d with %d", l.Version, len(l.IDs), n+1, n)
	}
}
