package audit_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"

	"github.com/agentmesh/agentmesh/audit"
)

// A log with checkpoints: the writer signs its tree, anyone with the verifier key checks
// the whole log against the checkpoint and one record's inclusion offline.
func ExampleVerifyLog() {
	dir, err := os.MkdirTemp("", "audit-example")
	if err != nil {
		panic(err)
	}
	defer func() { _ = os.RemoveAll(dir) }()
	path := filepath.Join(dir, "audit.log")

	// In production the key is in the host's PKCS#11 token.
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	l, err := audit.Open(audit.Config{Path: path, Origin: "example.org/host/h1/audit", Signer: key})
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	for range 5 {
		if err := l.Append(audit.Handshake{Direction: "inbound", Result: "ok", Transport: "tls"}); err != nil {
			panic(err)
		}
	}
	if err := l.Sync(ctx); err != nil {
		panic(err)
	}
	if err := l.Checkpoint(ctx); err != nil { // Run also signs by itself, every 1000 records or 10s
		panic(err)
	}
	note, _ := l.Latest()
	cancel()
	if err := <-done; err != nil {
		panic(err)
	}

	signer, _ := audit.NewNoteSigner("example.org/host/h1/audit", key)
	rep, err := audit.VerifyLog(path, audit.VerifyOptions{Checkpoint: note, Key: signer.VerifierKey()})
	fmt.Println(rep.Records, "records, checkpoint", rep.Checkpoint.Size, "signed:", rep.CheckpointSigned, "err:", err)

	proof, err := audit.ProveFile(path, 3, note)
	if err != nil {
		panic(err)
	}
	v, _ := audit.ParseVerifierKey(signer.VerifierKey())
	c, err := audit.CheckInclusion(proof, v)
	fmt.Println("record 3 in", c.Origin, "at size", c.Size, "err:", err)
	// Output:
	// 5 records, checkpoint 5 signed: true err: <nil>
	// record 3 in example.org/host/h1/audit at size 5 err: <nil>
}
