package ca

import (
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/mod/sumdb/note"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/metrictest"
	"github.com/agentmesh/agentmesh/meshapi"
)

// witnessHost is a host of a test: its mTLS client and its audit log.
type witnessHost struct {
	id  spiffeid.ID
	hc  *http.Client
	log *memLog
}

func newWitnessHost(t *testing.T, ca *runningCA, name string) *witnessHost {
	t.Helper()
	id := spiffeid.RequireFromPath(testTD, "/host/"+name)
	return &witnessHost{id: id, hc: httpsClient(t, ca, tlsCert(enroll(t, ca, id))),
		log: newMemLog(t, meshapi.AuditOrigin(id), newKey(t))}
}

// accept posts req and wants it cosigned by the CA: it returns the answer.
func (h *witnessHost) accept(t *testing.T, ca *runningCA, req meshapi.CheckpointRequest) meshapi.CheckpointResponse {
	t.Helper()
	status, b := postCheckpoint(t, ca, h.hc, req)
	if status != http.StatusOK {
		t.Fatalf("checkpoint of %s from %d: %d %s", h.id, req.OldSize, status, b)
	}
	resp := decodeJSON[meshapi.CheckpointResponse](t, b)
	_, c, err := audit.OpenCheckpoint([]byte(resp.Cosigned), verifier(t, req.Key), verifier(t, resp.WitnessKey))
	if err != nil {
		t.Fatalf("cosigned checkpoint: %v", err)
	}
	if _, sent := h.log.Latest(); c != sent && req.Key == h.log.signer.VerifierKey() {
		t.Fatalf("cosigned %+v, sent %+v", c, sent)
	}
	return resp
}

// witnessed is what ca's public API holds of origin; it fails unless found.
func witnessed(t *testing.T, ca *runningCA, origin string) meshapi.WitnessedLog {
	t.Helper()
	status, b := getWitnessed(t, ca, origin)
	if status != http.StatusOK {
		t.Fatalf("GET witnessed log %s: %d %s", origin, status, b)
	}
	return decodeJSON[meshapi.WitnessedLog](t, b)
}

func latestSize(t *testing.T, wl meshapi.WitnessedLog, keys ...string) uint64 {
	t.Helper()
	vs := []note.Verifier{}
	for _, k := range keys {
		vs = append(vs, verifier(t, k))
	}
	_, c, err := audit.OpenCheckpoint([]byte(wl.Latest), vs...)
	if err != nil {
		t.Fatalf("latest of %s: %v", wl.Origin, err)
	}
	return c.Size
}

// errorBody is the CA's error answer, with the witness's code.
type errorBody struct {
	Status  int    `json:"status"`
	Message string `json:"message"`
	Code    string `json:"code"`
}

// A host's log witnessed from its first checkpoint: extended, answered 409 from a
// size the CA does not hold, refused when signed by another key or of another
// origin, refused as inconsistent when rewritten (held checkpoint unchanged, state
// inconsistent, audited, counted) across a restart of the CA, until forgotten.
func TestWitnessHostLog(t *testing.T) {
	cfg, _ := testConfig(t)
	reg := prometheus.NewRegistry()
	rec := &auditRecorder{}
	cfg.Audit, cfg.Registerer = rec, reg
	ca := startCA(t, cfg)
	h := newWitnessHost(t, ca, "h1")
	origin := h.log.origin
	hostKey := h.log.signer.VerifierKey()
	counted := func(result checkpointResult) float64 {
		return metrictest.Value(t, reg, metricWitnessCheckpoints, labelResult, string(result))
	}

	h.log.add(t, "a", 3)
	h.log.sign(t)
	first := h.accept(t, ca, h.log.request(t, 0))
	wl := witnessed(t, ca, origin)
	if wl.Latest != first.Cosigned || wl.Key != hostKey || !slices.Equal(wl.WitnessKeys, []string{first.WitnessKey}) ||
		wl.State != string(witnessOK) || len(wl.History) != 0 {
		t.Fatalf("witnessed after the first checkpoint: %+v", wl)
	}
	if binds := eventsOf[audit.WitnessEvent](rec); len(binds) != 1 || binds[0].Action != witnessActionBind ||
		binds[0].Key != hostKey || binds[0].Initiator != h.id.String() || binds[0].Size != 3 {
		t.Fatalf("bind records: %+v", binds)
	}

	// 409 from a size the CA does not hold: the answer names the one it holds.
	h.log.add(t, "b", 2)
	h.log.sign(t)
	status, b := postCheckpoint(t, ca, h.hc, h.log.request(t, 0))
	if conflict := decodeJSON[meshapi.CheckpointConflict](t, b); status != http.StatusConflict ||
		conflict.Size != 3 || conflict.Cosigned != first.Cosigned {
		t.Fatalf("checkpoint from 0 while 3 is held: %d %s", status, b)
	}
	h.accept(t, ca, h.log.request(t, 3))
	h.accept(t, ca, h.log.request(t, 5)) // the same again: idempotent
	wl = witnessed(t, ca, origin)
	if latestSize(t, wl, hostKey, first.WitnessKey) != 5 || len(wl.History) != 1 || wl.History[0].Size != 3 {
		t.Fatalf("witnessed after extending to 5: %+v", wl)
	}

	// Another key, and another origin, are refused; neither is "inconsistent".
	other := newMemLog(t, origin, newKey(t))
	other.add(t, "c", 6)
	other.sign(t)
	foreign := &memLog{origin: meshapi.AuditOrigin(spiffeid.RequireFromPath(testTD, "/host/h2")), signer: h.log.signer}
	foreign.add(t, "d", 6)
	foreign.sign(t)
	for name, req := range map[string]meshapi.CheckpointRequest{"key": other.request(t, 5), "origin": foreign.request(t, 5)} {
		status, b := postCheckpoint(t, ca, h.hc, req)
		if e := decodeJSON[errorBody](t, b); status != http.StatusForbidden || e.Code != "" {
			t.Errorf("checkpoint of another %s: %d %s", name, status, b)
		}
	}
	if n := counted(checkpointInvalid); n != 2 {
		t.Errorf("invalid checkpoints counted %v, want 2", n)
	}
	if refused := slices.DeleteFunc(eventsOf[audit.WitnessEvent](rec), func(e audit.WitnessEvent) bool {
		return e.Reason != reasonKeyChanged
	}); len(refused) != 1 || refused[0].Key != other.signer.VerifierKey() {
		t.Errorf("key change records: %+v", refused)
	}

	// A rewritten log, signed by the host's own key, with a proof of its own: refused.
	rewritten := &memLog{origin: origin, signer: h.log.signer}
	rewritten.add(t, "rewritten", 7)
	rewritten.sign(t)
	status, b = postCheckpoint(t, ca, h.hc, rewritten.request(t, 5))
	if e := decodeJSON[errorBody](t, b); status != http.StatusForbidden || e.Code != meshapi.CodeAuditInconsistent {
		t.Fatalf("rewritten log: %d %s", status, b)
	}
	wantInconsistent := func(ca *runningCA, g prometheus.Gatherer) {
		t.Helper()
		wl := witnessed(t, ca, origin)
		if latestSize(t, wl, hostKey, first.WitnessKey) != 5 || wl.State != string(witnessInconsistent) {
			t.Errorf("witnessed after the rewrite: size %d, %+v", latestSize(t, wl, hostKey), wl)
		}
		if n := metrictest.Value(t, g, metricWitnessedLogs, labelState, string(witnessInconsistent)); n != 1 {
			t.Errorf("inconsistent logs: %v, want 1", n)
		}
	}
	wantInconsistent(ca, reg)
	if n := counted(checkpointInconsistent); n != 1 {
		t.Errorf("inconsistent checkpoints counted %v, want 1", n)
	}
	refusals := slices.DeleteFunc(eventsOf[audit.WitnessEvent](rec), func(e audit.WitnessEvent) bool {
		return e.Reason != reasonInconsistent
	})
	if len(refusals) != 1 || refusals[0].Size != 7 || refusals[0].HeldSize != 5 || refusals[0].Initiator != h.id.String() ||
		refusals[0].CallerSerial == "" {
		t.Errorf("inconsistency records: %+v", refusals)
	}

	// A restarted CA holds the same, with the same witness key (kept in the token).
	if err := ca.stop(); err != nil {
		t.Fatal(err)
	}
	reg = prometheus.NewRegistry()
	cfg.Registerer = reg
	ca = startCA(t, cfg)
	wantInconsistent(ca, reg)
	if wl := witnessed(t, ca, origin); !slices.Equal(wl.WitnessKeys, []string{first.WitnessKey}) {
		t.Errorf("witness keys after a restart: %v, want %s", wl.WitnessKeys, first.WitnessKey)
	}

	// Forgotten (a replaced disk), the origin starts again with any key.
	ctx := context.Background()
	forgotten, err := ForgetAuditLog(ctx, cfg.StateDir, ForgetRequest{Origin: origin, Reason: "disk replaced"})
	if err != nil || forgotten.Key != hostKey {
		t.Fatalf("ForgetAuditLog: %+v, %v", forgotten, err)
	}
	if status, _ := getWitnessed(t, ca, origin); status != http.StatusNotFound {
		t.Errorf("GET a forgotten log: %d, want 404", status)
	}
	forgets := slices.DeleteFunc(eventsOf[audit.WitnessEvent](rec), func(e audit.WitnessEvent) bool { return e.Action != witnessActionForget })
	if len(forgets) != 1 || forgets[0].Result != witnessResultOK || forgets[0].Actor != audit.PeerUIDActor(os.Getuid()) ||
		forgets[0].HeldSize != 5 || forgets[0].Reason != "disk replaced" {
		t.Errorf("forget records: %+v", forgets)
	}
	other.sign(t)
	h.accept(t, ca, other.request(t, 0))
	if wl := witnessed(t, ca, origin); wl.Key != other.signer.VerifierKey() || wl.State != string(witnessOK) {
		t.Errorf("witnessed after forget: %+v", wl)
	}
	for origin, status := range map[string]int{"mesh.test/host/none/audit": http.StatusNotFound, meshapi.CAAuditOrigin(testTD): http.StatusBadRequest} {
		var re *meshapi.ResponseError
		if _, err := ForgetAuditLog(ctx, cfg.StateDir, ForgetRequest{Origin: origin}); !errors.As(err, &re) || re.Status != status {
			t.Errorf("forget %s: %v, want %d", origin, err, status)
		}
	}
}

// A log without a checkpoint within WitnessStaleAfter is stale.
func TestWitnessStale(t *testing.T) {
	cfg, _ := testConfig(t)
	reg := prometheus.NewRegistry()
	cfg.Registerer, cfg.WitnessStaleAfter = reg, time.Nanosecond
	ca := startCA(t, cfg)
	h := newWitnessHost(t, ca, "h1")
	h.log.add(t, "a", 1)
	h.log.sign(t)
	h.accept(t, ca, h.log.request(t, 0))
	if wl := witnessed(t, ca, h.log.origin); wl.State != string(witnessStale) {
		t.Errorf("state %q, want stale", wl.State)
	}
	if n := metrictest.Value(t, reg, metricWitnessedLogs, labelState, string(witnessStale)); n != 1 {
		t.Errorf("stale logs: %v, want 1", n)
	}
	if age := metrictest.Value(t, reg, metricOldestCheckpointAge); age <= 0 {
		t.Errorf("oldest checkpoint age %v, want > 0", age)
	}
	st, err := WitnessStatus(context.Background(), cfg.StateDir)
	if err != nil || len(st) != 1 || st[0].Origin != h.log.origin || st[0].State != string(witnessStale) {
		t.Errorf("WitnessStatus: %+v, %v", st, err)
	}
}

func TestWitnessState(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 12, 8, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name string
		rec  witnessRecord
		want witnessState
	}{
		{"recent", witnessRecord{LastSeen: now.Add(-29 * time.Second)}, witnessOK},
		{"at the bound", witnessRecord{LastSeen: now.Add(-30 * time.Second)}, witnessOK},
		{"past the bound", witnessRecord{LastSeen: now.Add(-31 * time.Second)}, witnessStale},
		{"refused, recent", witnessRecord{LastSeen: now, Refused: &refusedCheckpoint{}}, witnessInconsistent},
		{"refused, stale", witnessRecord{LastSeen: now.Add(-time.Hour), Refused: &refusedCheckpoint{}}, witnessInconsistent},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := tc.rec.state(now, 30*time.Second); got != tc.want {
				t.Errorf("state = %s, want %s", got, tc.want)
			}
		})
	}
}

// The CA's own log is witnessed by the proxies: each answer carries the CA's latest
// checkpoint with a proof from the one the host last cosigned, the host's next request
// returns it cosigned, and the public API serves the largest one cosigned, with every
// host's cosignature of it. The alert rules in deploy/ select what the CA exports.
func TestWitnessCALog(t *testing.T) {
	cfg, _ := testConfig(t)
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	caOrigin := meshapi.CAAuditOrigin(testTD)
	var caLog *memLog
	cfg.OpenAuditLog = func(key crypto.Signer) (CheckpointLog, error) {
		caLog = newMemLog(t, caOrigin, key)
		return caLog, nil
	}
	ca := startCA(t, cfg)
	h1, h2 := newWitnessHost(t, ca, "h1"), newWitnessHost(t, ca, "h2")
	for _, h := range []*witnessHost{h1, h2} {
		h.log.add(t, "a", 2)
		h.log.sign(t)
	}
	if resp := h1.accept(t, ca, h1.log.request(t, 0)); resp.CACheckpoint != "" {
		t.Errorf("a ca checkpoint before the ca's log signed one: %q", resp.CACheckpoint)
	}
	if status, _ := getWitnessed(t, ca, caOrigin); status != http.StatusNotFound {
		t.Errorf("GET the ca's log before any cosignature: %d, want 404", status)
	}

	caLog.add(t, "ca", 4)
	caLog.sign(t)
	// cosign is what a host does with an answer: check the CA checkpoint against the
	// last one it cosigned, cosign it.
	cosign := func(h *witnessHost, resp meshapi.CheckpointResponse, last *audit.Checkpoint) (string, audit.Checkpoint) {
		t.Helper()
		proof, err := decodeProof(resp.CAProof)
		if err != nil {
			t.Fatal(err)
		}
		msg, c, err := audit.Cosign([]byte(resp.CACheckpoint), verifier(t, resp.WitnessKey), last, proof, h.log.signer)
		if err != nil {
			t.Fatalf("%s cosigns the ca's checkpoint: %v", h.id, err)
		}
		return string(msg), c
	}
	resp := h1.accept(t, ca, h1.log.request(t, 2))
	caKey := resp.WitnessKey
	h1Cosigned, ca4 := cosign(h1, resp, nil)
	caLog.add(t, "ca", 3)
	caLog.sign(t)
	h1.log.add(t, "b", 1)
	h1.log.sign(t)
	req := h1.log.request(t, 2)
	req.CACosigned, req.CASize = h1Cosigned, ca4.Size
	resp = h1.accept(t, ca, req)
	h1Cosigned7, ca7 := cosign(h1, resp, &ca4) // checks the proof from 4 to 7
	if ca4.Size != 4 || ca7.Size != 7 || len(resp.CAProof) == 0 {
		t.Fatalf("ca checkpoints %d, %d, proof %v", ca4.Size, ca7.Size, resp.CAProof)
	}
	wl := witnessed(t, ca, caOrigin)
	if latestSize(t, wl, caKey, h1.log.signer.VerifierKey()) != 4 || wl.Key != caKey ||
		!slices.Equal(wl.WitnessKeys, []string{h1.log.signer.VerifierKey()}) {
		t.Fatalf("the ca's log witnessed by h1: %+v", wl)
	}

	// h2 cosigns 7 first; then h1 cosigns 7 too: both cosignatures are served.
	resp = h2.accept(t, ca, h2.log.request(t, 0))
	h2Cosigned, _ := cosign(h2, resp, nil)
	h2.log.add(t, "b", 1)
	h2.log.sign(t)
	req = h2.log.request(t, 2)
	req.CACosigned, req.CASize = h2Cosigned, 7
	h2.accept(t, ca, req)
	wl = witnessed(t, ca, caOrigin)
	if latestSize(t, wl, caKey, h2.log.signer.VerifierKey()) != 7 || len(wl.WitnessKeys) != 1 ||
		len(wl.History) != 1 || wl.History[0].Size != 4 {
		t.Fatalf("the ca's log witnessed by h2 at 7: %+v", wl)
	}
	req = h1.log.request(t, 3)
	req.CACosigned, req.CASize = h1Cosigned7, 7
	h1.accept(t, ca, req)
	wl = witnessed(t, ca, caOrigin)
	if latestSize(t, wl, caKey, h1.log.signer.VerifierKey(), h2.log.signer.VerifierKey()) != 7 || len(wl.WitnessKeys) != 2 {
		t.Fatalf("the ca's log witnessed by both at 7: %+v", wl)
	}

	// A "cosignature" of a checkpoint the CA never signed is not kept; the host's own
	// checkpoint still is.
	forged := newMemLog(t, caOrigin, newKey(t))
	forged.add(t, "forged", 9)
	forged.sign(t)
	_, forgedCP := forged.Latest()
	forgedMsg, err := audit.SignCheckpoint(forgedCP, forged.signer, h1.log.signer)
	if err != nil {
		t.Fatal(err)
	}
	req = h1.log.request(t, 3)
	req.CACosigned, req.CASize = string(forgedMsg), 9
	h1.accept(t, ca, req)
	if wl := witnessed(t, ca, caOrigin); latestSize(t, wl, caKey) != 7 {
		t.Errorf("a forged ca checkpoint was kept: %+v", wl)
	}
	// The CA's own records (the two bindings) went to its log.
	if binds := eventsOf[audit.WitnessEvent](&caLog.auditRecorder); len(binds) != 2 {
		t.Errorf("the ca's log holds %d witness records, want 2", len(binds))
	}
	st, err := WitnessStatus(context.Background(), cfg.StateDir)
	if err != nil || len(st) != 3 || st[0].Origin != caOrigin || st[0].State != string(witnessOK) {
		b, _ := json.Marshal(st)
		t.Errorf("WitnessStatus: %s, %v", b, err)
	}
	// Every series the alert rules select now exists.
	checkAlertRules(t, reg)
}
