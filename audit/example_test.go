package audit_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/agentmesh/agentmesh/audit"
)

func Example() {
	dir, err := os.MkdirTemp("", "audit-example")
	if err != nil {
		panic(err)
	}
	defer func() { _ = os.RemoveAll(dir) }()
	path := filepath.Join(dir, "audit.log")

	// A fixed clock makes the output reproducible; production leaves Now nil.
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	l, err := audit.Open(audit.Config{Path: path, Now: func() time.Time { return now }})
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()

	if err := l.Append(audit.Handshake{
		Direction: "inbound", Result: "ok", Transport: "tls",
		PeerID: "spiffe://example.org/agent/build", TLSVersion: "TLS 1.3",
		Duration: 1500 * time.Microsecond,
	}); err != nil {
		panic(err)
	}
	if err := l.Append(audit.Connection{
		Direction: "inbound", PeerID: "spiffe://example.org/agent/build",
		Target: "127.0.0.1:8080", BytesIn: 512, BytesOut: 2048, Duration: time.Second,
	}); err != nil {
		panic(err)
	}
	if err := l.Sync(ctx); err != nil { // both records are on disk now
		panic(err)
	}
	cancel()
	if err := <-done; err != nil {
		panic(err)
	}

	f, err := os.Open(path)
	if err != nil {
		panic(err)
	}
	defer func() { _ = f.Close() }() // read only
	first, _ := bufio.NewReader(f).ReadString('\n')
	fmt.Print(first)

	if _, err := f.Seek(0, 0); err != nil {
		panic(err)
	}
	n, err := audit.Verify(f)
	fmt.Println(n, "records, err:", err)
	// Output:
	// {"seq":1,"time":"2025-01-02T03:04:05Z","type":"handshake","prev":"0000000000000000000000000000000000000000000000000000000000000000","direction":"inbound","result":"ok","transport":"tls","peer_id":"spiffe://example.org/agent/build","tls_version":"TLS 1.3","resumed":false,"duration_ns":1500000,"hash":"20c90070e3f7125095d9c069622f4946100504989d57b2677849377fd0e05399"}
	// 2 records, err: <nil>
}
