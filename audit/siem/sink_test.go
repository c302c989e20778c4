package siem_test

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/audit/siem"
)

// runSink starts a sink of the log at path to r until stop or the end of the test.
func runSink(t *testing.T, r *receiver, path string, mod func(*siem.Config)) (reg *prometheus.Registry, stop func()) {
	t.Helper()
	reg = prometheus.NewRegistry()
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
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Error(err)
			}
		})
	}
	t.Cleanup(stop)
	return reg, stop
}

func TestSinkFraming(t *testing.T) {
	t.Parallel()
	l, path := openLog(t)
	appendN(t, l, 5)
	r := newReceiver(t)
	_, _ = runSink(t, r, path, nil)
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
	reg, _ := runSink(t, r, path, func(c *siem.Config) {
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
	reg, _ := runSink(t, r, path, nil)
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

// TestSinkCursor: a sink starts at its cursor, skipping the segments before it, and a
// clean stop leaves the cursor after the last record sent.
func TestSinkCursor(t *testing.T) {
	t.Parallel()
	path, _ := segmentedLog(t)
	if err := os.WriteFile(path+".siem", []byte("5\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := newReceiver(t)
	_, stop := runSink(t, r, path, nil)
	for seq := uint64(5); seq <= 8; seq++ {
		if m := r.next(t); m.seq != seq {
			t.Fatalf("got seq %d, want %d", m.seq, seq)
		}
	}
	stop()
	if b, err := os.ReadFile(path + ".siem"); err != nil || string(b) != "9\n" {
		t.Fatalf("cursor after a clean stop: %q, %v; want 9", b, err)
	}
}

// alerts is an audit log stand-in that passes on the records appended.
type alerts chan audit.Event

func (a alerts) Append(e audit.Event) error {
	a <- e
	return nil
}

// TestSinkBacklogFull: with the receiver away and more records waiting than the bound,
// the sink raises its alert, metric and one audit record, and drops nothing: once the
// receiver is back every record arrives.
func TestSinkBacklogFull(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "audit.log")
	writeLines(t, path, 1, 50)
	r := newReceiver(t)
	addr := r.ln.Addr().String()
	if err := r.ln.Close(); err != nil { // away: connections are refused
		t.Fatal(err)
	}
	got := make(alerts, 4)
	reg, _ := runSink(t, r, path, func(c *siem.Config) {
		c.MaxBacklog, c.Audit, c.ReconnectMax = 10, got, 200*time.Millisecond
	})
	select {
	case e := <-got:
		bf, ok := e.(siem.BacklogFull)
		if !ok || bf.Kind() != "siem_backlog" {
			t.Fatalf("audit record %#v, want a siem.BacklogFull", e)
		}
		if bf.Backlog <= 10 || bf.Max != 10 || bf.Next != 1 || bf.Address != addr {
			t.Errorf("alert record %+v", bf)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no backlog alert within 10s")
	}
	if v := metric(t, reg, "agentmesh_audit_siem_backlog_full"); v != 1 {
		t.Errorf("backlog_full = %v, want 1", v)
	}
	if v := metric(t, reg, "agentmesh_audit_siem_backlog_records"); v <= 10 {
		t.Errorf("backlog_records = %v, want more than 10", v)
	}
	// Back on the same address: everything arrives, and the alert clears.
	r2 := relisten(t, r, addr)
	for seq := uint64(1); seq <= 50; seq++ {
		if m := r2.next(t); m.seq != seq {
			t.Fatalf("got seq %d, want %d", m.seq, seq)
		}
	}
	select {
	case e := <-got:
		t.Errorf("a second alert record %#v in one episode", e)
	default:
	}
}
