package e2e

import (
	"context"
	"fmt"
	"github.com/agentmesh/agentmesh/meshclient"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TestCAAudit: the CA's audit log holds one issuance record for each token, enrolment,
// renewal and refusal of the test, each naming its caller (the admin socket's uid,
// the presenting host's SVID and serial, the token's ID hash), and no token.
func TestCAAudit(t *testing.T) {
	requireE2E(t)
	authority := startCA(t, 10*time.Minute)
	id := func(path string) string { return "spiffe://" + trustDomain + "/" + path }
	hostA, hostC, agent, unregistered := id("host/a"), id("host/c"), id("agent/planner"), id("agent/unregistered")
	if _, errOut, err := runCmdOut(t, binary, "register", agent, "--host", hostA, "--uid", "1001", "--state", authority.state); err != nil {
		t.Fatalf("register: %v\n%s", err, errOut)
	}
	admin := fmt.Sprintf("uid:%d", os.Getuid())

	// Tokens from the admin socket and enrolments with them; a rekey.
	a := enrollAs(t, authority, hostA)
	enrolledA := a.svid.Certificates[0].SerialNumber.String()
	a.renew(t)
	renewedA := a.svid.Certificates[0].SerialNumber.String()
	c := enrollAs(t, authority, hostC)
	u := enrollAs(t, authority, unregistered)

	// An agent token over the mesh API, for the host the entry names, and one refused to
	// another host.
	if status, body := agentToken(t, authority, a, agent); status != http.StatusOK {
		t.Fatalf("agent token for host a: %d %s", status, body)
	}
	if status, _ := agentToken(t, authority, c, agent); status != http.StatusForbidden {
		t.Fatalf("agent token for host c: %d, want 403", status)
	}

	// Refusals: a token used twice, a token that is none, a renewal the CA refuses (an
	// agent identity without a registration entry).
	if _, err := a.client.Enroll(t.Context(), spiffeid.RequireFromString(hostA), a.key); err == nil {
		t.Fatal("a used token enrolled again")
	}
	bogus, err := meshclient.NewClient(meshclient.ClientConfig{URL: authority.url, Roots: a.roots,
		Token: func(context.Context) (string, error) { return "not.a.token", nil }})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bogus.Enroll(t.Context(), spiffeid.RequireFromString(hostC), c.key); err == nil {
		t.Fatal("an invalid token enrolled")
	}
	if err := u.renewErr(t); err == nil {
		t.Fatal("an unregistered agent identity was renewed")
	}

	caAudit := &meshProxy{process: authority.process, dir: authority.state}
	want := []map[string]string{
		{"action": "token", "result": "ok", "initiator": admin, "spiffe_id": hostA},
		{"action": "enroll", "result": "ok", "initiator": "token", "spiffe_id": hostA, "serial": enrolledA},
		{"action": "rekey", "result": "ok", "initiator": hostA, "caller_serial": enrolledA, "serial": renewedA},
		{"action": "token", "result": "ok", "initiator": admin, "spiffe_id": hostC},
		{"action": "enroll", "result": "ok", "initiator": "token", "spiffe_id": hostC},
		{"action": "token", "result": "ok", "initiator": admin, "spiffe_id": unregistered},
		{"action": "enroll", "result": "ok", "initiator": "token", "spiffe_id": unregistered, "serial": u.svid.Certificates[0].SerialNumber.String()},
		{"action": "token", "result": "ok", "initiator": hostA, "caller_serial": renewedA, "spiffe_id": agent, "host": hostA},
		{"action": "token", "result": "refused", "reason": "not_allowed", "initiator": hostC, "spiffe_id": agent},
		{"action": "enroll", "result": "refused", "reason": "token_reused", "initiator": "token", "spiffe_id": hostA},
		{"action": "enroll", "result": "refused", "reason": "token_invalid", "initiator": "token"},
		{"action": "rekey", "result": "refused", "reason": "not_allowed", "initiator": unregistered,
			"caller_serial": u.svid.Certificates[0].SerialNumber.String()},
	}
	// Written before each answer, so all are there once the last call returned; the
	// wait covers the writer's group commit.
	awaitRecord(t, caAudit, want[len(want)-1], time.Minute)
	var got []map[string]any
	for _, r := range readAudit(t, filepath.Join(authority.state, "audit.log")) {
		if r["type"] == "issuance" {
			got = append(got, r)
		}
	}
	if len(got) != len(want) {
		t.Fatalf("%d issuance records, want %d:\n%v", len(got), len(want), got)
	}
	for i, w := range want {
		if !matches(got[i], w) {
			t.Errorf("record %d: %v\nwant %v", i, got[i], w)
		}
	}
	// The enrolments and the tokens they used name the same token ID.
	if got[0]["token_id"] == nil || got[0]["token_id"] != got[1]["token_id"] || got[1]["token_id"] != got[9]["token_id"] {
		t.Errorf("token IDs: issued %v, enrolled %v, reused %v", got[0]["token_id"], got[1]["token_id"], got[9]["token_id"])
	}
}
