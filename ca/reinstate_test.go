package ca

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"
)

// signWithValidity posts an enrolment for id with a fresh key asking step-ca for this
// NotBefore (a client may ask for one), and returns the status.
func signWithValidity(t *testing.T, ca *runningCA, id spiffeid.ID, notBefore time.Time) (int, []byte) {
	t.Helper()
	tok, err := ca.Token(id)
	if err != nil {
		t.Fatalf("Token: %v", err)
	}
	csr, err := meshapi.NewCSR(id, newKey(t))
	if err != nil {
		t.Fatal(err)
	}
	body := map[string]any{"csr": csr, "ott": tok, "notBefore": notBefore.Format(time.RFC3339),
		"notAfter": notBefore.Add(time.Minute).Format(time.RFC3339)}
	return do(t, httpsClient(t, ca, nil), http.MethodPost, ca.URL()+"/1.0/sign", body)
}

// reinstatements are the audit records of reinstatements.
func (r *auditRecorder) reinstatements() []audit.Revocation {
	return slices.DeleteFunc(r.revocations(), func(rec audit.Revocation) bool { return rec.Action != actionReinstate })
}

// An identity revoked and reinstated enrols again with a new token; everything
// issued before the revocation stays refused by the CA (renewal, registration,
// issuance with an earlier NotBefore) and by the deny-list, whose entry carries the
// cutoff. Reinstating is for operators only and audited.
func TestRevocationCutoffReinstate(t *testing.T) {
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	cfg.Audit = rec
	ca := startCA(t, cfg)
	ctx := context.Background()
	bd := backdate(cfg.SVIDLifetime)

	id := spiffeid.RequireFromPath(testTD, "/host/r")
	old := enroll(t, ca, id)
	admin := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/admin/op"))
	worker := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/host/w"))
	adminCfg := meshclient.ClientConfig{URL: ca.URL(), Roots: ca.Roots()}
	regURL := ca.URL() + meshapi.Prefix + meshapi.RegisterPath

	if _, err := RequestReinstate(ctx, cfg.StateDir, meshapi.ReinstateRequest{SPIFFEID: id.String(), Reason: "not revoked"}); !isStatus(err, http.StatusConflict) {
		t.Fatalf("reinstating an identity never revoked: %v, want 409", err)
	}
	before := time.Now()
	if _, err := RequestRevoke(ctx, cfg.StateDir, meshapi.RevokeRequest{SPIFFEID: id.String(), Reason: "key compromise"}); err != nil {
		t.Fatalf("RequestRevoke: %v", err)
	}
	if _, err := ca.Token(id); !errors.Is(err, ErrRevoked) {
		t.Fatalf("Token after the revocation: %v, want ErrRevoked", err)
	}

	t.Run("the entry carries the cutoff", func(t *testing.T) {
		l, _ := servedDenyList(t, ca, httpsClient(t, ca, tlsCert(worker)))
		if len(l.IDs) != 1 {
			t.Fatalf("ids = %+v, want one entry", l.IDs)
		}
		e := l.IDs[0]
		if !e.NotBefore.Equal(e.RevokedAt.Add(-bd)) || e.RevokedAt.Before(before.Add(-time.Second)) {
			t.Errorf("entry %+v: cutoff is not the revocation time minus the backdate %v", e, bd)
		}
		if !e.NotAfter.After(old.Certificates[0].NotAfter.Add(-time.Second)) {
			t.Errorf("entry expires %v, before the certificate it covers (%v)", e.NotAfter, old.Certificates[0].NotAfter)
		}
		if !l.Denies(id, serialOf(old), old.Certificates[0].NotBefore) {
			t.Error("the list does not deny the certificate issued before the revocation")
		}
	})

	t.Run("only operators reinstate, audited", func(t *testing.T) {
		if _, err := meshclient.ReinstateRemote(ctx, adminCfg, *tlsCert(worker), meshapi.ReinstateRequest{SPIFFEID: id.String(), Reason: "me"}); !isStatus(err, http.StatusForbidden) {
			t.Fatalf("a host SVID reinstated: %v, want 403", err)
		}
		recs := rec.reinstatements()
		if len(recs) == 0 || recs[len(recs)-1].Result != "refused" || recs[len(recs)-1].Initiator != worker.ID.String() {
			t.Errorf("refused reinstatement audited as %+v", recs)
		}
		if _, err := ca.Token(id); !errors.Is(err, ErrRevoked) {
			t.Errorf("Token after a refused reinstatement: %v, want ErrRevoked", err)
		}
	})

	res, err := meshclient.ReinstateRemote(ctx, adminCfg, *tlsCert(admin), meshapi.ReinstateRequest{SPIFFEID: id.String(), Reason: "host rebuilt"})
	if err != nil {
		t.Fatalf("ReinstateRemote: %v", err)
	}
	if r := rec.reinstatements(); r[len(r)-1].Result != "ok" || r[len(r)-1].Initiator != admin.ID.String() || r[len(r)-1].Reason != "host rebuilt" {
		t.Errorf("reinstatement audited as %+v", r[len(r)-1])
	}
	if _, err := RequestReinstate(ctx, cfg.StateDir, meshapi.ReinstateRequest{SPIFFEID: id.String(), Reason: "again"}); !isStatus(err, http.StatusConflict) {
		t.Errorf("reinstating twice: %v, want 409", err)
	}
	fresh := enroll(t, ca, id) // a new token enrols again
	if nb := fresh.Certificates[0].NotBefore; nb.Before(res.Cutoff) {
		t.Fatalf("new certificate NotBefore %v is before the cutoff %v", nb, res.Cutoff)
	}

	t.Run("old certificate stays refused", func(t *testing.T) {
		client := newClient(t, ca, nil)
		if _, err := client.Renew(ctx, old, newKey(t)); err == nil || !permanent(err) {
			t.Errorf("renewal of the old certificate: %v, want a permanent refusal", err)
		}
		if status, body := do(t, httpsClient(t, ca, tlsCert(old)), http.MethodPost, regURL, registerBody(15008, "10.0.9.1")); status != http.StatusForbidden {
			t.Errorf("registration with the old certificate: %d %s, want 403", status, body)
		}
		l, _ := servedDenyList(t, ca, httpsClient(t, ca, tlsCert(worker)))
		if !l.Denies(id, serialOf(old), old.Certificates[0].NotBefore) {
			t.Error("the deny-list no longer denies the old certificate")
		}
		if l.Denies(id, serialOf(fresh), fresh.Certificates[0].NotBefore) {
			t.Error("the deny-list denies the certificate issued after the reinstatement")
		}
	})

	t.Run("new certificate works", func(t *testing.T) {
		chain, err := newClient(t, ca, nil).Renew(ctx, fresh, newKey(t))
		if err != nil {
			t.Fatalf("renewal of the new certificate: %v", err)
		}
		if chain[0].NotBefore.Before(res.Cutoff) {
			t.Errorf("renewed NotBefore %v before the cutoff %v", chain[0].NotBefore, res.Cutoff)
		}
		if status, body := do(t, httpsClient(t, ca, tlsCert(fresh)), http.MethodPost, regURL, registerBody(15008, "10.0.9.2")); status != http.StatusOK {
			t.Errorf("registration with the new certificate: %d %s", status, body)
		}
	})

	t.Run("no issuance before the cutoff, none dated after issue", func(t *testing.T) {
		if status, body := signWithValidity(t, ca, id, res.Cutoff.Add(-30*time.Second)); status < 400 {
			t.Errorf("an enrolment asking for a NotBefore before the cutoff: %d %s, want a refusal", status, body)
		}
		if status, body := signWithValidity(t, ca, spiffeid.RequireFromPath(testTD, "/host/f"), time.Now().Add(30*time.Second)); status < 400 {
			t.Errorf("an enrolment asking for a NotBefore in the future: %d %s, want a refusal", status, body)
		}
	})

	t.Run("revoked again, the later cutoff covers the new certificate", func(t *testing.T) {
		if _, err := RequestRevoke(ctx, cfg.StateDir, meshapi.RevokeRequest{SPIFFEID: id.String(), Reason: "again"}); err != nil {
			t.Fatalf("RequestRevoke: %v", err)
		}
		l, _ := servedDenyList(t, ca, httpsClient(t, ca, tlsCert(worker)))
		if len(l.IDs) != 2 || !l.Denies(id, "1", fresh.Certificates[0].NotBefore) {
			t.Errorf("after a second revocation: ids %+v", l.IDs)
		}
		if _, err := ca.Token(id); !errors.Is(err, ErrRevoked) {
			t.Errorf("Token after the second revocation: %v, want ErrRevoked", err)
		}
	})
}

// The CA drops an identity entry once every certificate it covers has expired, and
// publishes the shrunk list, which a holder of the previous version accepts.
func TestDenyListPrunedAfterExpiry(t *testing.T) {
	cfg, _ := testConfig(t)
	cfg.SVIDLifetime = 10 * time.Second
	ca := startCA(t, cfg)
	ctx := context.Background()
	id := spiffeid.RequireFromPath(testTD, "/host/p")
	victim := enroll(t, ca, id)
	reader := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/admin/reader"))
	hc := httpsClient(t, ca, tlsCert(reader))
	if _, err := RequestRevoke(ctx, cfg.StateDir, meshapi.RevokeRequest{SPIFFEID: id.String(), Reason: "gone"}); err != nil {
		t.Fatal(err)
	}
	revoked, _ := servedDenyList(t, ca, hc)
	if len(revoked.IDs) != 1 || len(revoked.Serials) != 1 {
		t.Fatalf("revoked list: ids %+v, serials %+v", revoked.IDs, revoked.Serials)
	}
	// The reader's own certificate expires too: renew it on the way.
	deadline := time.Now().Add(time.Minute)
	var pruned *meshapi.DenyList
	for pruned == nil && time.Now().Before(deadline) {
		chain, err := newClient(t, ca, nil).Renew(ctx, reader, reader.PrivateKey)
		if err == nil {
			reader = &x509svid.SVID{ID: reader.ID, Certificates: chain, PrivateKey: reader.PrivateKey}
			hc = httpsClient(t, ca, tlsCert(reader))
		}
		// Long-poll the directory: its version moves with every new list.
		status, body := do(t, hc, http.MethodGet, ca.URL()+meshapi.Prefix+meshapi.DirectoryPath+"?since="+strconv.FormatUint(currentDirVersion(t, ca, hc), 10)+"&wait=3s", nil)
		if status != http.StatusOK {
			continue
		}
		doc := decodeJSON[meshapi.DirectoryDocument](t, body)
		l, err := meshapi.VerifyDenyList(doc.Revocations, testTD, ca.Roots(), time.Now())
		if err == nil && l.Version > revoked.Version && len(l.IDs)+len(l.Serials) == 0 {
			pruned = l
		}
	}
	if pruned == nil {
		t.Fatal("no pruned list published within a minute of the revocation")
	}
	if len(pruned.IDs)+len(pruned.Serials) != 0 || pruned.ExpiredThrough.Before(victim.Certificates[0].NotAfter) {
		t.Fatalf("pruned list: ids %+v, serials %+v, expired through %v", pruned.IDs, pruned.Serials, pruned.ExpiredThrough)
	}
	if ok, err := meshapi.NextDenyList(revoked, pruned, time.Now()); !ok || err != nil {
		t.Errorf("a holder of the revoked list refuses the pruned one: %v, %v", ok, err)
	}
	if ok, err := meshapi.NextDenyList(pruned, revoked, time.Now()); ok || !errors.Is(err, meshapi.ErrDenyListStale) {
		t.Errorf("the revoked list after the pruned one: %v, %v; want meshapi.ErrDenyListStale", ok, err)
	}
	// The identity stays revoked at the CA: the entry only left the list.
	if _, err := ca.Token(id); !errors.Is(err, ErrRevoked) {
		t.Errorf("Token after pruning: %v, want ErrRevoked", err)
	}
}

// currentDirVersion is the directory version served now.
func currentDirVersion(t *testing.T, ca *runningCA, hc *http.Client) uint64 {
	t.Helper()
	status, body := do(t, hc, http.MethodGet, ca.URL()+meshapi.Prefix+meshapi.DirectoryPath+"?wait=0s", nil)
	if status != http.StatusOK {
		t.Fatalf("directory: %d %s", status, body)
	}
	return decodeJSON[meshapi.DirectoryDocument](t, body).Version
}

// isStatus reports whether err is a *meshapi.ResponseError with this status.
func isStatus(err error, status int) bool {
	var re *meshapi.ResponseError
	return errors.As(err, &re) && re.Status == status
}

// A revocation recorded before cutoffs existed denies every certificate of the
// identity, so reinstating it is refused rather than leaving it unable to enrol.
func TestReinstateWithoutCutoff(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	id := spiffeid.RequireFromPath(testTD, "/host/legacy")
	if _, err := ca.db.rev.mark(revocationMark{SPIFFEID: id, Reason: "old", RevokedAt: time.Now().UTC()}); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.Reinstate(context.Background(), audit.Actor{Initiator: "test"}, meshapi.ReinstateRequest{SPIFFEID: id.String(), Reason: "try"}); !errors.Is(err, ErrInvalidRequest) {
		t.Errorf("Reinstate: %v, want ErrInvalidRequest", err)
	}
	if _, err := ca.Token(id); !errors.Is(err, ErrRevoked) {
		t.Errorf("Token: %v, want ErrRevoked", err)
	}
}
