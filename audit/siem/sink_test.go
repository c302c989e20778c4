package siem_test

import (
	"context"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/audit/siem"
)

// runSink starts a sink of the log at path to r until the end of the test.
func runSink(t *testing.T, r *receiver, path string, mod func(*siem.Config)) *prometheus.Registry {
	t.Helper()
	reg := prometheus.NewRegistry()
	cfg := siem.Config{Log: path, Address: r.ln.Addr().String(), TLS: r.tlsConfig(), Hostname: "host-a",
		Origin: `example.org/audit/a "b"`, Registerer: reg}
	if mod != nil {
		mod(&cfg)
	}
	s, err := siem.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return reg
}

func TestSinkFraming(t *testing.T) {
	t.Parallel()
	l, path := openLog(t)
	appendN(t, l, 5)
	r := newReceiver(t)
	runSink(t, r, path, nil)
	appendN(t, l, 5) // followed as the log grows
	want := lines(t, path)
	for seq := uint64(1); seq <= 10; seq++ {
		m := r.next(t)
		if m.seq != seq {
			t.Fatalf("message %d has seq %d", seq, m.seq)
		}
		if m.line != want[seq] {
			t.Errorf("seq %d: MSG %q, want the record line %q", seq, m.line, want[seq])
		}
		if m.msgID != "handshake" || m.origin != `example.org/audit/a \"b\"` {
			t.Errorf("seq %d: MSGID %q origin %q", seq, m.msgID, m.origin)
		}
	}
}

func TestSinkFilter(t *testing.T) {
	t.Parallel()
	l, path := openLog(t)
	appendN(t, l, 10) // odd seqs ok, even refused
	r := newReceiver(t)
	reg := runSink(t, r, path, func(c *siem.Config) {
		c.Filter = siem.Filter{Include: []siem.Rule{{Type: "handshake"}}, Exclude: []siem.Rule{{Type: "handshake", Result: "ok"}}}
	})
	for want := uint64(2); want <= 10; want += 2 {
		if m := r.next(t); m.seq != want {
			t.Fatalf("got seq %d, want %d: ok handshakes are excluded", m.seq, want)
		}
	}
	// The cursor moved past the filtered records: one more refused record comes next.
	appendN(t, l, 2)
	if m := r.next(t); m.seq != 12 {
		t.Fatalf("got seq %d, want 12", m.seq)
	}
	if got := metric(t, reg, "agentmesh_audit_siem_filtered_total"); got != 6 {
		t.Errorf("filtered_total = %v, want 6", got)
	}
}

// TestSinkResend drops the connection after some records: the sink reconnects and sends
// again from the first record it wrote within the resend window, so every seq arrives and
// the repeats are those of the window only.
func TestSinkResend(t *testing.T) {
	t.Parallel()
	l, path := openLog(t)
	appendN(t, l, 20)
	r := newReceiver(t)
	reg := runSink(t, r, path, nil)
	first := <-r.conns
	for seq := uint64(1); seq <= 20; seq++ {
		if m := r.next(t); m.seq != seq {
			t.Fatalf("got seq %d, want %d", m.seq, seq)
		}
	}
	_ = first.Close() // the receiver goes away; what it had read is what it got
	second := <-r.conns
	defer func() { _ = second.Close() }()
	appendN(t, l, 10)
	// Everything was written within the window (2s) before the drop was noticed: the
	// whole log comes again, then the new records, each once.
	seen := map[uint64]int{}
	for len(seen) < 30 {
		m := r.next(t)
		seen[m.seq]++
	}
	for seq := uint64(1); seq <= 30; seq++ {
		if seen[seq] != 1 {
			t.Errorf("seq %d arrived %d times on the new connection, want once", seq, seen[seq])
		}
	}
	if got := metric(t, reg, "agentmesh_audit_siem_resent_total"); got != 20 {
		t.Errorf("resent_total = %v, want 20", got)
	}
}
