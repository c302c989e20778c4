package e2e

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestPooledCredentialLimits runs a CA issuing 10-second SVIDs and two proxies on a
// pooled transport (h2, then quic) under steady load: new HTTP connections and echo
// sessions that each hold a stream for a while, more of them at once than one pooled
// connection may carry. From the receiving proxy's audit records (one per stream, with
// its pooled connection and that connection's certificates) it checks that no stream
// started on a connection past either certificate's NotAfter, that no connection
// carried more streams at once than pool.max_streams while the load needed more, and
// that no legitimate request or session failed; then, with the load stopped, that the
// idle connections are closed after pool.idle_timeout.
func TestPooledCredentialLimits(t *testing.T) {
	requireE2E(t)
	for _, transport := range []string{"h2", "quic"} {
		t.Run(transport, func(t *testing.T) { pooledCredentialLimits(t, transport) })
	}
}

func pooledCredentialLimits(t *testing.T, transport string) {
	const (
		lifetime   = 10 * time.Second
		renewals   = 3
		maxStreams = 4
		idle       = 3 * time.Second
		sessions   = 6 // echo sessions at once: more than maxStreams
		rate       = 30
	)
	ca := startCA(t, lifetime)
	// Renewing when 15% of the lifetime is left (minus jitter) puts each renewal
	// inside the last two seconds, where pooled connections to the old certificate
	// already take no new streams: the pool's own limit, not the renewal, moves the
	// streams to fresh connections.
	extra := fmt.Sprintf("rotation:\n  renew_fraction: 0.15\ntransports: [%s, tls]\naudit:\n  streams: true\n"+
		"pool:\n  max_streams: %d\n  idle_timeout: %s\n", transport, maxStreams, idle)
	a, b, httpRoute, echoRoute := startLoadPair(t, ca, transport, extra)

	ctx, stopLoad := context.WithCancel(t.Context())
	defer stopLoad()
	var wg sync.WaitGroup
	var requests, failed, echoed atomic.Int64
	fail := func(format string, args ...any) {
		if failed.Add(1) <= 5 {
			t.Errorf(format, args...)
		}
	}
	// Echo sessions of 1.5 s each, back to back: every one must carry its bytes both
	// ways and end cleanly, whatever connection its stream rode.
	for range sessions {
		wg.Go(func() {
			for ctx.Err() == nil {
				sctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
				err := echoOnce(sctx, echoRoute)
				cancel()
				if err != nil {
					fail("echo session: %v", err)
					return
				}
				echoed.Add(1)
			}
		})
	}
	wg.Go(func() {
		requestLoad(ctx, httpRoute, rate, &requests, func(err error) { fail("request: %v", err) })
	})

	// Load through several renewals of both proxies (the enrolment is one rotation).
	waitFor(t, 3*time.Minute, fmt.Sprintf("more than %d rotations on both proxies", renewals), func() error {
		ra, _ := countAudit(t, a.auditPath())
		rb, _ := countAudit(t, b.auditPath())
		if ra <= renewals || rb <= renewals {
			return fmt.Errorf("%d and %d rotations", ra, rb)
		}
		return nil
	})
	stopLoad()
	wg.Wait()
	if failed.Load() != 0 {
		t.Errorf("%d of %d requests and %d echo sessions failed", failed.Load(), requests.Load(), echoed.Load())
	}
	expired := adminMetric(t, a.admin, "agentmesh_proxy_pool_ended_total", `reason="credential_expired"`) +
		adminMetric(t, b.admin, "agentmesh_proxy_pool_ended_total", `reason="credential_expired"`)
	if expired == 0 {
		t.Error("no pooled connection reached its certificates' limit: the test did not exercise it")
	}

	// Idle: with no stream left, every pooled connection closes, the dialing side's
	// after idle_timeout.
	idleStart := time.Now()
	for _, p := range []*meshProxy{a, b} {
		awaitMetricValue(t, p, "agentmesh_proxy_pool_connections", 0, 30*time.Second)
	}
	idleTook := time.Since(idleStart)
	// A connection that idles out needs certificates that outlive idle_timeout plus the
	// pool's 2 s margin on both ends; with 10 s SVIDs renewed late and out of phase, the
	// last one may well reach that limit first, and so may the connection of a fresh
	// echo session when a renewal lands inside its idle window. Both proxies rotate
	// before each session, so it starts with about 10 s of certificates on both ends;
	// a few attempts bound the test however the renewals fall.
	idleClosed := func() bool {
		return adminMetric(t, a.admin, "agentmesh_proxy_pool_ended_total", `direction="outbound"`, `reason="idle_timeout"`) > 0
	}
	for attempt := 0; attempt < 3 && !idleClosed(); attempt++ {
		for _, p := range []*meshProxy{a, b} {
			if out, errOut, err := runCmd(t.Context(), "rotate", "--state", p.dir, "--reason", "e2e idle check"); err != nil {
				t.Fatalf("%s: rotate: %v\n%s%s", p.name, err, out, errOut)
			}
		}
		sctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		if err := echoOnce(sctx, echoRoute); err != nil {
			t.Errorf("echo session after the load: %v", err)
		}
		cancel()
		for _, p := range []*meshProxy{a, b} {
			awaitMetricValue(t, p, "agentmesh_proxy_pool_connections", 0, 30*time.Second)
		}
	}
	if !idleClosed() {
		t.Error("no outbound pooled connection closed for idle_timeout")
	}

	for _, p := range []*meshProxy{a, b} {
		if err := p.stop(); err != nil {
			t.Errorf("%s exited with %v", p.name, err)
		}
	}
	streams, refusedExpired, maxConcurrent, maxPerConn := checkStreams(t, readAudit(t, b.auditPath()), transport)
	if refusedExpired != 0 {
		t.Errorf("%d streams refused on expired connections: the dialing side opened them", refusedExpired)
	}
	if maxPerConn > maxStreams {
		t.Errorf("a pooled connection carried %d streams at once, max_streams is %d", maxPerConn, maxStreams)
	}
	if maxConcurrent <= maxStreams {
		t.Errorf("at most %d streams at once: the load never needed a second connection", maxConcurrent)
	}
	fmt.Printf("transport=%s requests=%d echo_sessions=%d failed=%d streams=%d max_concurrent=%d max_per_connection=%d credential_expired=%v idle_close=%v\n",
		transport, requests.Load(), echoed.Load(), failed.Load(), streams, maxConcurrent, maxPerConn, expired, idleTook.Round(100*time.Millisecond))
}

// checkStreams checks the receiving proxy's stream records of transport: each started
// while both certificates of its pooled connection were valid (connection records
// carry them). It returns how many streams were carried, how many were refused because
// a certificate had expired, and the most streams open at once overall and on one
// pooled connection.
//
// A stream's record is written once its splice is over, which for quic can be after
// quic-go has returned the stream's credit to the peer (when our FIN is acknowledged)
// and the peer has used it: each stream is taken to end recordLag before its record
// says, so that only the echo sessions, which last far longer, count for concurrency.
func checkStreams(t *testing.T, recs []map[string]any, transport string) (carried, refusedExpired, maxConcurrent, maxPerConn int) {
	t.Helper()
	const recordLag = 250 * time.Millisecond
	type span struct{ start, end time.Time }
	byConn := map[string][]span{}
	var all []span
	peers := map[string]bool{}
	for _, r := range recs {
		if r["type"] != "connection" || r["direction"] != "inbound" || r["transport"] != transport {
			continue
		}
		if r["reason"] == "credential_expired" {
			refusedExpired++
			continue
		}
		started := recordField(t, r, "started")
		for _, f := range []string{"peer_not_after", "local_not_after"} {
			if na := recordField(t, r, f); !started.Before(na) {
				t.Errorf("stream started at %s on connection %v past its %s %s", started, r["conn_id"], f, na)
			}
		}
		d, _ := r["duration_ns"].(float64)
		s := span{started, started.Add(max(time.Duration(d)-recordLag, 0))}
		id := fmt.Sprint(r["conn_id"])
		byConn[id] = append(byConn[id], s)
		all = append(all, s)
		peers[fmt.Sprint(r["peer_serial"])] = true
		carried++
	}
	if len(peers) < 3 {
		t.Errorf("streams from %d peer certificates, want the load across several renewals", len(peers))
	}
	concurrent := func(spans []span) int {
		type edge struct {
			at    time.Time
			delta int
		}
		var edges []edge
		for _, s := range spans {
			if s.end.After(s.start) {
				edges = append(edges, edge{s.start, 1}, edge{s.end, -1})
			}
		}
		// Ends sort before starts at the same instant: touching spans do not overlap.
		slices.SortFunc(edges, func(a, b edge) int {
			if c := a.at.Compare(b.at); c != 0 {
				return c
			}
			return a.delta - b.delta
		})
		n, top := 0, 0
		for _, e := range edges {
			n += e.delta
			top = max(top, n)
		}
		return top
	}
	for _, spans := range byConn {
		maxPerConn = max(maxPerConn, concurrent(spans))
	}
	return carried, refusedExpired, concurrent(all), maxPerConn
}

// recordField parses a time field of an audit record; a missing one fails the test.
func recordField(t *testing.T, r map[string]any, field string) time.Time {
	t.Helper()
	ts, err := time.Parse(time.RFC3339Nano, fmt.Sprint(r[field]))
	if err != nil {
		t.Fatalf("record %v: %s: %v", r, field, err)
	}
	return ts
}
