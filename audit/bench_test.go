package audit_test

import (
	"bytes"
	"fmt"
	"testing"

	"golang.org/x/mod/sumdb/tlog"

	"github.com/agentmesh/agentmesh/audit"
)

// BenchmarkAppendSync measures committed throughput: each iteration appends a batch of
// records then waits for Sync, so every batch costs at least one fsync. records/s is the
// figure to compare; ns/op is per batch.
func BenchmarkAppendSync(b *testing.B) {
	for _, batch := range []int{1, 100, 1000} {
		b.Run(fmt.Sprintf("sync_every_%d", batch), func(b *testing.B) {
			benchAppendSync(b, audit.Config{Path: tempLog(b)}, batch)
		})
	}
}

// benchAppendSync appends batch records and waits for Sync, per iteration.
func benchAppendSync(b *testing.B, cfg audit.Config, batch int) {
	l := start(b, cfg)
	e := handshake(1)
	records := 0
	for b.Loop() {
		for range batch {
			if err := l.Append(e); err != nil {
				b.Fatal(err)
			}
		}
		if err := l.Sync(b.Context()); err != nil {
			b.Fatal(err)
		}
		records += batch
	}
	b.ReportMetric(float64(records)/b.Elapsed().Seconds(), "records/s")
}

// BenchmarkAppendSyncParallel has many goroutines each wait for its own record to be
// durable, the worst case for a log without group commit: concurrent Syncs share fsyncs.
func BenchmarkAppendSyncParallel(b *testing.B) {
	l := start(b, audit.Config{Path: tempLog(b)})
	e := handshake(1)
	b.SetParallelism(32)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := l.Append(e); err != nil {
				b.Error(err)
				return
			}
			if err := l.Sync(b.Context()); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "records/s")
}

// BenchmarkAppend is the hot-path cost a handshake pays: marshal and enqueue, no waiting for
// the disk (the queue only fills if the disk cannot keep up).
func BenchmarkAppend(b *testing.B) {
	l := start(b, audit.Config{Path: tempLog(b)})
	e := handshake(1)
	b.ReportAllocs()
	for b.Loop() {
		if err := l.Append(e); err != nil {
			b.Fatal(err)
		}
	}
	if err := l.Sync(b.Context()); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkAppendSyncCheckpoints is BenchmarkAppendSync with everything the audit path
// does on a proxy: the Merkle hashes of every record (always on), and checkpoints signed
// every 1000 records and cosigned by an in-process witness. Compare records/s with
// BenchmarkAppendSync.
func BenchmarkAppendSyncCheckpoints(b *testing.B) {
	for _, batch := range []int{1, 100, 1000} {
		b.Run(fmt.Sprintf("sync_every_%d", batch), func(b *testing.B) {
			benchAppendSync(b, audit.Config{Path: tempLog(b), Origin: testOrigin, Signer: newKey(b), Witness: newTestWitness(b)}, batch)
		})
	}
}

// BenchmarkMerklePerRecord is the tree's share of the writer's work per record: one leaf
// hash of the record's line and, on average, one node hash (a tree of n leaves has n-1
// interior nodes).
func BenchmarkMerklePerRecord(b *testing.B) {
	line := bytes.TrimSuffix(writeLog(b, 1), []byte("\n"))
	var left tlog.Hash
	b.SetBytes(int64(len(line)))
	for b.Loop() {
		left = tlog.NodeHash(left, tlog.RecordHash(line))
	}
}
