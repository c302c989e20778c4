package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

const cmdTestOrigin = "example.org/host/h1/audit"

// cosigner is a witness in memory: audit.Cosign with what it holds.
type cosigner struct {
	signer *audit.NoteSigner
	mu     sync.Mutex
	wl     meshapi.WitnessedLog
	held   *audit.Checkpoint
}

func (c *cosigner) Witness(_ context.Context, req audit.WitnessRequest) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	writer, err := audit.ParseVerifierKey(req.Key)
	if err != nil {
		return nil, err
	}
	out, cp, err := audit.Cosign(req.Checkpoint, writer, c.held, req.Proof, c.signer)
	if err != nil {
		return nil, err
	}
	if c.held != nil {
		c.wl.History = append(c.wl.History, meshapi.CheckpointSummary{Size: c.held.Size, Hash: base64.StdEncoding.EncodeToString(c.held.Hash[:])})
	}
	c.held, c.wl.Latest, c.wl.Key = &cp, string(out), req.Key
	return out, nil
}

func ecKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestAuditCommands: verify, prove and check-proof on a witnessed log, then verify
// --witness on a rewritten copy.
func TestAuditCommands(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	ws, err := audit.NewNoteSigner("example.org/ca/witness", ecKey(t))
	if err != nil {
		t.Fatal(err)
	}
	w := &cosigner{signer: ws, wl: meshapi.WitnessedLog{Origin: cmdTestOrigin, WitnessKeys: []string{ws.VerifierKey()}, State: "ok"}}
	key := ecKey(t)
	l, err := audit.Open(audit.Config{Path: path, Origin: cmdTestOrigin, Signer: key, Witness: w, CheckpointInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	for i := range 20 {
		if err := l.Append(audit.Handshake{Direction: "inbound", Result: "ok", Transport: "tls", PeerAddr: "10.0.0.1:1"}); err != nil {
			t.Fatal(err)
		}
		if i%5 == 4 {
			if err := l.Sync(t.Context()); err != nil {
				t.Fatal(err)
			}
			if err := l.Checkpoint(t.Context()); err != nil {
				t.Fatal(err)
			}
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewTLSServer(http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) {
		w.mu.Lock()
		defer w.mu.Unlock()
		_ = json.NewEncoder(rw).Encode(w.wl) // the client sees a short body
	}))
	defer srv.Close()
	root := filepath.Join(dir, "root.pem")
	if err := os.WriteFile(root, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}

	out, err := runRoot(t, "audit", "verify", path, "--witness", srv.URL, "--root", root)
	if err != nil || !strings.Contains(out, "OK (20 records; checkpoint 20, signature checked; witnessed 20)") {
		t.Fatalf("verify --witness = %q, %v", out, err)
	}
	out, err = runRoot(t, "audit", "prove", path, "--index", "7")
	if err != nil {
		t.Fatalf("prove = %q, %v", out, err)
	}
	proof := filepath.Join(dir, "proof.json")
	if err := os.WriteFile(proof, []byte(out), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := runRoot(t, "audit", "check-proof", proof, "--key", w.wl.Key, "--key", ws.VerifierKey()); err != nil || !strings.HasPrefix(out, "OK: record 7 ") {
		t.Fatalf("check-proof = %q, %v", out, err)
	}
	other, _ := audit.NewNoteSigner(cmdTestOrigin, ecKey(t))
	if out, err := runRoot(t, "audit", "check-proof", proof, "--key", other.VerifierKey()); err == nil {
		t.Fatalf("check-proof with a key that did not sign = %q, want an error", out)
	}

	// Cut the tail: the witness saw 20 records.
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ls := strings.SplitAfter(string(b), "\n")
	if err := os.WriteFile(path, []byte(strings.Join(ls[:17], "")), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path + ".checkpoint"); err != nil {
		t.Fatal(err)
	}
	out, err = runRoot(t, "audit", "verify", path, "--witness", srv.URL, "--root", root)
	if err == nil || !strings.Contains(out, "BAD after 17 good records") || !strings.Contains(out, "index 17") {
		t.Fatalf("verify --witness of a cut log = %q, %v; want BAD naming index 17", out, err)
	}
}
