package ca

import (
	"bytes"
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testaudit"
	"github.com/agentmesh/agentmesh/meshapi"
)

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

	// The CA's log idle, a host returning the same cosignature still counts as seen.
	before := wl.LastSeen
	req = h2.log.request(t, 3)
	req.CACosigned, req.CASize = h2Cosigned, 7
	h2.accept(t, ca, req)
	if wl := witnessed(t, ca, caOrigin); !wl.LastSeen.After(before) || latestSize(t, wl, caKey) != 7 {
		t.Errorf("the ca's log cosigned again at 7: last seen %v, was %v", wl.LastSeen, before)
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

// startRealCALog has cfg's CA write its own log to a real audit log at path, signing
// checkpoints only when asked (Checkpoint), run until after the CA has stopped.
func startRealCALog(t *testing.T, cfg *Config, path string) func() *audit.Log {
	t.Helper()
	var l *audit.Log
	cfg.OpenAuditLog = func(key crypto.Signer) (CheckpointLog, error) {
		var err error
		l, err = audit.Open(audit.Config{Path: path, Origin: meshapi.CAAuditOrigin(testTD), Signer: key,
			CheckpointRecords: 1 << 30, CheckpointInterval: time.Hour})
		if err != nil {
			return nil, err
		}
		// Registered before startCA's own cleanup, so it runs after the CA stopped.
		testaudit.Run(t, l)
		return l, nil
	}
	return func() *audit.Log { return l }
}

// The CA's own audit log, a real one, witnessed by a proxy: `audit verify --witness`'s
// check (audit.VerifyLog against the public API's answer) passes on it, and fails on
// a copy cut before the checkpoint the proxy cosigned.
func TestWitnessRealCALog(t *testing.T) {
	cfg, _ := testConfig(t)
	path := filepath.Join(t.TempDir(), "ca-audit.log")
	caLog := startRealCALog(t, &cfg, path)
	ca := startCA(t, cfg)
	ctx := context.Background()
	checkpoint := func() audit.Checkpoint {
		t.Helper()
		if err := caLog().Sync(ctx); err != nil {
			t.Fatal(err)
		}
		if err := caLog().Checkpoint(ctx); err != nil {
			t.Fatal(err)
		}
		_, c := caLog().Latest()
		return c
	}
	h := newWitnessHost(t, ca, "h1") // its enrolment is the CA log's first records
	h.log.add(t, "a", 1)
	h.log.sign(t)
	h.accept(t, ca, h.log.request(t, 0)) // and the binding of its key
	first := checkpoint()
	resp := h.accept(t, ca, h.log.request(t, 1))
	msg, c, err := audit.Cosign([]byte(resp.CACheckpoint), verifier(t, resp.WitnessKey), nil, nil, h.log.signer)
	if err != nil || c != first {
		t.Fatalf("the ca's checkpoint %+v (latest %+v): %v", c, first, err)
	}
	newWitnessHost(t, ca, "h2") // more records
	second := checkpoint()
	req := h.log.request(t, 1)
	req.CACosigned, req.CASize = string(msg), first.Size
	resp = h.accept(t, ca, req)
	proof, err := decodeProof(resp.CAProof)
	if err != nil {
		t.Fatal(err)
	}
	msg, c, err = audit.Cosign([]byte(resp.CACheckpoint), verifier(t, resp.WitnessKey), &first, proof, h.log.signer)
	if err != nil || c != second || second.Size <= first.Size {
		t.Fatalf("the ca's checkpoint from %d: %+v (latest %+v): %v", first.Size, c, second, err)
	}
	req.CACosigned, req.CASize = string(msg), second.Size
	h.accept(t, ca, req)

	view, err := witnessed(t, ca, meshapi.CAAuditOrigin(testTD)).View()
	if err != nil {
		t.Fatal(err)
	}
	if rep, err := audit.VerifyLog(path, audit.VerifyOptions{Witness: &view}); err != nil || rep.Records < second.Size {
		t.Fatalf("VerifyLog of the ca's log against its witnesses: %+v, %v", rep, err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := bytes.SplitAfter(b, []byte("\n"))
	cut := filepath.Join(t.TempDir(), "cut.log")
	if err := os.WriteFile(cut, bytes.Join(lines[:first.Size], nil), 0o600); err != nil {
		t.Fatal(err)
	}
	var ve *audit.VerifyError
	if _, err := audit.VerifyLog(cut, audit.VerifyOptions{Witness: &view}); !errors.As(err, &ve) || ve.Seq != first.Size+1 {
		t.Errorf("VerifyLog of a copy cut to %d records, before the witnessed %d: %v; want the first missing record named", first.Size, second.Size, err)
	}
}
