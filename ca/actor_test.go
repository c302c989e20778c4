package ca

import (
	"context"
	"net/http"
	"net/netip"
	"os"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

// since returns the events recorded after the first n.
func (r *auditRecorder) since(n int) []audit.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]audit.Event(nil), r.events[n:]...)
}

func (r *auditRecorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.events)
}

// tlsActorOf is who a request presenting svid is in audit records.
func tlsActorOf(svid *x509svid.SVID) audit.Actor {
	return audit.Actor{Initiator: svid.ID.String(), CallerSerial: serialOf(svid)}
}

// Every administrative act names its caller in its audit record: the admin socket's
// peer uid, or the SPIFFE ID and serial of the certificate presented over mTLS (the
// mesh API, step-ca's revoke route). Each act is made through its real transport and
// the records it appended are read back.
func TestAdminRecordsNameTheirCaller(t *testing.T) {
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	cfg.Audit = rec
	ca := startCA(t, cfg)
	ctx := context.Background()
	state := cfg.StateDir
	id := func(p string) spiffeid.ID { return spiffeid.RequireFromPath(testTD, p) }
	hostA, agent := id("/host/a"), id("/agent/x")
	a := enroll(t, ca, hostA)
	op := enroll(t, ca, id("/admin/op"))
	d := enroll(t, ca, id("/host/d"))
	enroll(t, ca, id("/host/b"))
	enroll(t, ca, id("/host/c"))
	mesh := func(svid *x509svid.SVID, path string, body any) func(t *testing.T) {
		return func(t *testing.T) {
			t.Helper()
			if status, b := do(t, httpsClient(t, ca, tlsCert(svid)), http.MethodPost, ca.URL()+meshapi.Prefix+path, body); status >= 500 {
				t.Fatalf("%s: %d %s", path, status, b)
			}
		}
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	socket := audit.PeerUIDActor(os.Getuid())
	is := func(kind string) func(audit.Event) bool {
		return func(e audit.Event) bool { return e.Kind() == kind }
	}
	rotationAction := func(action audit.CARotationAction) func(audit.Event) bool {
		return func(e audit.Event) bool { r, ok := e.(audit.CARotation); return ok && r.Action == action }
	}

	for _, tc := range []struct {
		name  string
		act   func(t *testing.T)
		match func(audit.Event) bool // the act's own records among those appended meanwhile
		want  audit.Actor
	}{
		{"token (admin socket)", func(*testing.T) { _, err := RequestToken(ctx, state, id("/host/e")); must(err) }, is("issuance"), socket},
		{"register entry (admin socket)", func(*testing.T) {
			must(RegisterEntry(ctx, state, meshapi.Entry{ID: agent, Host: hostA, UID: 1000}))
		}, is("registration"), socket},
		{"agent token (mesh API)", mesh(a, meshapi.AgentTokenPath, meshapi.AgentTokenRequest{ID: agent.String()}), is("issuance"), tlsActorOf(a)},
		{"unregister entry (admin socket)", func(*testing.T) { must(UnregisterEntry(ctx, state, agent)) }, is("registration"), socket},
		{"register host claim (admin socket)", func(*testing.T) {
			_, err := RegisterHost(ctx, state, hostA, []netip.Prefix{netip.MustParsePrefix("10.9.0.0/24")})
			must(err)
		}, is("address_claim"), socket},
		{"unregister host claim (admin socket)", func(*testing.T) { must(UnregisterHost(ctx, state, hostA)) }, is("address_claim"), socket},
		{"fleet rotation (admin socket)", func(*testing.T) { _, err := RequestFleetRotation(ctx, state, "drill"); must(err) }, is("rotation"), socket},
		{"revoke (mesh API)", mesh(op, meshapi.RevokePath, meshapi.RevokeRequest{SPIFFEID: id("/host/b").String(), Reason: "r"}), is("revocation"), tlsActorOf(op)},
		{"reinstate (mesh API)", mesh(op, meshapi.ReinstatePath, meshapi.ReinstateRequest{SPIFFEID: id("/host/b").String(), Reason: "r"}), is("revocation"), tlsActorOf(op)},
		{"revoke (admin socket)", func(*testing.T) {
			_, err := RequestRevoke(ctx, state, meshapi.RevokeRequest{SPIFFEID: id("/host/c").String(), Reason: "r"})
			must(err)
		}, is("revocation"), socket},
		{"reinstate (admin socket)", func(*testing.T) {
			_, err := RequestReinstate(ctx, state, meshapi.ReinstateRequest{SPIFFEID: id("/host/c").String(), Reason: "r"})
			must(err)
		}, is("revocation"), socket},
		{"revoke (step-ca route)", func(t *testing.T) {
			body := map[string]any{"serial": serialOf(d), "reasonCode": 1, "reason": "key compromise", "passive": true}
			if status, b := do(t, httpsClient(t, ca, tlsCert(d)), http.MethodPost, ca.URL()+"/1.0/revoke", body); status != http.StatusOK {
				t.Fatalf("step-ca revoke: %d %s", status, b)
			}
		}, is("revocation"), tlsActorOf(d)},
		{"start ca rotation (admin socket)", func(*testing.T) {
			_, err := StartRotation(ctx, state, meshapi.RotateRequest{Kind: meshapi.RotateIntermediate, Reason: "drill"})
			must(err)
		}, rotationAction(audit.CARotationStart), socket},
		{"exclude from ca rotation (admin socket)", func(*testing.T) {
			_, err := ExcludeFromRotation(ctx, state, meshapi.RotationExclude{Host: id("/host/b"), Reason: "gone"})
			must(err)
		}, rotationAction(audit.CARotationExclude), socket},
		// Refused or not, an acknowledgement names the proxy that sent it.
		{"acknowledge a ca rotation step (mesh API)", mesh(a, meshapi.AnchorAckPath, meshapi.AnchorAck{ID: 1, Phase: meshapi.PhaseDistribute, BundleVersion: "v"}),
			rotationAction(audit.CARotationAck), tlsActorOf(a)},
		{"abort ca rotation (admin socket)", func(*testing.T) { _, err := AbortRotation(ctx, state, "drill over"); must(err) },
			rotationAction(audit.CARotationAbort), socket},
		// Refused (the CA witnesses no such log) or not, a forget names its operator.
		{"forget a witnessed audit log (admin socket)", func(*testing.T) {
			_, _ = ForgetAuditLog(ctx, state, ForgetRequest{Origin: meshapi.AuditOrigin(id("/host/zz")), Reason: "disk replaced"})
		}, is("witness"), socket},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := rec.count()
			tc.act(t)
			n := 0
			for _, e := range rec.since(before) {
				if !tc.match(e) {
					continue
				}
				n++
				ae, ok := e.(audit.Attributed)
				if !ok {
					t.Fatalf("%T names no caller", e)
				}
				if got := ae.Caller(); got != tc.want {
					t.Errorf("%s record names %+v, want %+v", e.Kind(), got, tc.want)
				}
			}
			if n == 0 {
				t.Errorf("no record of the act among %+v", rec.since(before))
			}
		})
	}
}
