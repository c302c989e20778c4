package ca

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"
)

func TestMayRevoke(t *testing.T) {
	t.Parallel()
	host := spiffeid.RequireFromPath(testTD, "/host/a")
	other := spiffeid.RequireFromPath(testTD, "/host/b")
	admin := spiffeid.RequireFromPath(testTD, "/admin/op")
	for _, tc := range []struct {
		name   string
		caller spiffeid.ID
		t      revokeTarget
		owner  spiffeid.ID
		want   bool
	}{
		{"operator, identity", admin, revokeTarget{id: other}, spiffeid.ID{}, true},
		{"operator, another identity's serial", admin, revokeTarget{serial: "7"}, other, true},
		{"operator, unknown serial", admin, revokeTarget{serial: "7"}, spiffeid.ID{}, true},
		{"workload, own serial", host, revokeTarget{serial: "7"}, host, true},
		{"workload, another identity's serial", host, revokeTarget{serial: "7"}, other, false},
		{"workload, unknown serial", host, revokeTarget{serial: "7"}, spiffeid.ID{}, false},
		{"workload, own identity", host, revokeTarget{id: host}, spiffeid.ID{}, false},
		{"workload, another identity", host, revokeTarget{id: other}, spiffeid.ID{}, false},
		{"not under /admin/", spiffeid.RequireFromPath(testTD, "/administrator"), revokeTarget{id: other}, spiffeid.ID{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := mayRevoke(tc.caller, tc.t, tc.owner); got != tc.want {
				t.Errorf("mayRevoke = %v, want %v", got, tc.want)
			}
		})
	}
}

// A proxy that rotated away from a compromised key revokes its old certificate with
// its new SVID (`agentmesh rotate --compromised`): the serial is revoked and listed,
// the identity is not. It may not revoke another identity's serial, its own
// identity, or an unknown serial (all 403 and audited), and its revoked certificate
// can no longer revoke anything.
func TestMeshSelfRevocation(t *testing.T) {
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	cfg.Audit = rec
	ca := startCA(t, cfg)
	ctx := context.Background()
	cc := meshclient.ClientConfig{URL: ca.URL(), Roots: ca.Roots()}
	id := spiffeid.RequireFromPath(testTD, "/host/self")
	old := enroll(t, ca, id)
	key := newKey(t)
	chain, err := newClient(t, ca, nil).Renew(ctx, old, key)
	if err != nil {
		t.Fatal(err)
	}
	current := &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
	neighbour := enroll(t, ca, spiffeid.RequireFromPath(testTD, "/host/neighbour"))

	res, err := meshclient.RevokeRemote(ctx, cc, *tlsCert(current), meshapi.RevokeRequest{Serial: serialOf(old), Reason: "key compromised"})
	if err != nil {
		t.Fatalf("revoking its own previous serial: %v", err)
	}
	if res.ListVersion != 2 || !slices.Equal(res.Serials, []string{serialOf(old)}) {
		t.Errorf("result %+v, want version 2 with serial %s", res, serialOf(old))
	}
	if r := rec.last(t); r.Result != "ok" || r.Initiator != id.String() || r.Serial != serialOf(old) || r.SPIFFEID != "" {
		t.Errorf("audit record %+v, want ok by %s for serial %s", r, id, serialOf(old))
	}
	l, _ := servedDenyList(t, ca, httpsClient(t, ca, tlsCert(neighbour)))
	if !l.Denies(id, serialOf(old), time.Time{}) || l.Denies(id, serialOf(current), time.Time{}) || len(l.IDs) != 0 {
		t.Errorf("deny list %+v: want the old serial only, not the identity", l)
	}
	// Not an identity revocation: the current SVID renews and tokens are issued.
	if _, err := newClient(t, ca, nil).Renew(ctx, current, newKey(t)); err != nil {
		t.Errorf("Renew of the current SVID: %v", err)
	}
	if _, err := ca.Token(id); err != nil {
		t.Errorf("Token for the identity: %v", err)
	}
	if _, err := newClient(t, ca, nil).Renew(ctx, old, newKey(t)); !permanent(err) {
		t.Errorf("Renew of the revoked SVID: %v, want a permanent error", err)
	}

	for _, tc := range []struct {
		name string
		req  meshapi.RevokeRequest
	}{
		{"another identity's serial", meshapi.RevokeRequest{Serial: serialOf(neighbour), Reason: "r"}},
		{"its own identity", meshapi.RevokeRequest{SPIFFEID: id.String(), Reason: "r"}},
		{"another identity", meshapi.RevokeRequest{SPIFFEID: neighbour.ID.String(), Reason: "r"}},
		{"an unknown serial", meshapi.RevokeRequest{Serial: "123456789", Reason: "r"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := meshclient.RevokeRemote(ctx, cc, *tlsCert(current), tc.req)
			var re *meshapi.ResponseError
			if !errors.As(err, &re) || re.Status != http.StatusForbidden || !re.Permanent() {
				t.Fatalf("RevokeRemote: %v, want a permanent 403", err)
			}
			r := rec.last(t)
			if r.Result != "refused" || r.Initiator != id.String() || r.Serial != tc.req.Serial || r.SPIFFEID != tc.req.SPIFFEID {
				t.Errorf("audit record %+v, want refused by %s for %+v", r, id, tc.req)
			}
		})
	}
	var re *meshapi.ResponseError
	if _, err := meshclient.RevokeRemote(ctx, cc, *tlsCert(current), meshapi.RevokeRequest{Serial: "0123", Reason: "r"}); !errors.As(err, &re) || re.Status != http.StatusBadRequest {
		t.Errorf("RevokeRemote with a malformed serial: %v, want 400", err)
	}
	// The compromised certificate cannot strike back at its successor.
	if _, err := meshclient.RevokeRemote(ctx, cc, *tlsCert(old), meshapi.RevokeRequest{Serial: serialOf(current), Reason: "r"}); !errors.As(err, &re) || re.Status != http.StatusForbidden {
		t.Errorf("RevokeRemote with the revoked certificate: %v, want 403", err)
	}

	if l, _ := servedDenyList(t, ca, httpsClient(t, ca, tlsCert(neighbour))); l.Version != 2 {
		t.Errorf("refused requests moved the list to version %d", l.Version)
	}
	if _, err := newClient(t, ca, nil).Renew(ctx, neighbour, newKey(t)); err != nil {
		t.Errorf("Renew of the neighbour: %v", err)
	}
}
