package ca

import (
	"context"
	"errors"
	"net/http"
	"os"
	"slices"
	"sync"
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
	if a, c := counted(checkpointAccepted), counted(checkpointConflict); a != 3 || c != 1 {
		t.Errorf("accepted %v and conflict %v counted, want 3 and 1", a, c)
	}
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

// The store's slots under concurrent checkpoints, reads and forgets (run with -race):
// no data race, no deadlock, and every record read is whole.
func TestWitnessStoreConcurrent(t *testing.T) {
	t.Parallel()
	ws, err := loadWitness(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	origins := []string{"mesh.test/host/a/audit", "mesh.test/host/b/audit"}
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for n := range 50 {
				origin := origins[(i+n)%len(origins)]
				if i == 0 && n%10 == 9 {
					if _, err := ws.remove(origin); err != nil {
						t.Error(err)
					}
					continue
				}
				slot := ws.lock(origin)
				prev := slot.rec.Load()
				next := &witnessRecord{Origin: origin, History: []meshapi.CheckpointSummary{{Size: prev.latest().Size + 1}}}
				if err := ws.persist(next); err != nil {
					t.Error(err)
				}
				slot.rec.Store(next)
				slot.mu.Unlock()
				for _, r := range ws.records() {
					if len(r.History) != 1 {
						t.Errorf("a record read half made: %+v", r)
					}
				}
			}
		})
	}
	wg.Wait()
}

// BenchmarkWitnessCheckpoint is one host's checkpoint witnessed end to end over one
// kept-alive mTLS connection: the request, the proof's check, the CA's cosignature in
// the token, the record written atomically, the answer.
func BenchmarkWitnessCheckpoint(b *testing.B) {
	cfg, _ := testConfig(b)
	ca := startCA(b, cfg)
	id := spiffeid.RequireFromPath(testTD, "/host/bench")
	hc := httpsClient(b, ca, tlsCert(enroll(b, ca, id)))
	hc.Transport.(*http.Transport).DisableKeepAlives = false
	host := newMemLog(b, meshapi.AuditOrigin(id), newKey(b))
	var held uint64
	for b.Loop() {
		b.StopTimer()
		host.add(b, "r", 100)
		host.sign(b)
		req := host.request(b, held)
		b.StartTimer()
		if status, body := postCheckpoint(b, ca, hc, req); status != http.StatusOK {
			b.Fatalf("%d %s", status, body)
		}
		held = req.OldSize + 100
	}
}
