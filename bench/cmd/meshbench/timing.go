package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// The timing scenarios measure the real-time targets of the mesh's control paths on a
// pair of proxies of their own. The end-to-end tests check the same behaviour with
// deadlines that a loaded machine under -race cannot miss; the targets are checked here.

// timing is one measured duration and its target.
type timing struct {
	what  string
	value time.Duration // measured
	limit time.Duration // met when value <= limit
	err   error         // the scenario broke down: nothing measured
}

func (t timing) verdict() string {
	switch {
	case t.err != nil:
		return "n/a"
	case t.value <= t.limit:
		return "met"
	default:
		return "**missed**"
	}
}

// timingScenarios runs every timing scenario in turn.
func timingScenarios(ctx context.Context, ca *meshCA, dir string, echoPort int, logf func(string, ...any)) []timing {
	var ts []timing
	for _, sc := range []func(context.Context, *meshCA, string, int) []timing{revocationTiming, drainTiming} {
		got := sc(ctx, ca, dir, echoPort)
		for _, t := range got {
			if t.err != nil {
				logf("timing: %s: %v", t.what, t.err)
			} else {
				logf("timing: %s: %v (target ≤ %v)", t.what, t.value.Round(time.Millisecond), t.limit)
			}
		}
		ts = append(ts, got...)
	}
	return ts
}

// failed marks every timing of whats as not measured because of err.
func failed(err error, whats ...string) []timing {
	ts := make([]timing, len(whats))
	for i, w := range whats {
		ts[i] = timing{what: w, err: err}
	}
	return ts
}

const (
	timingRefused = "revocation: new connections of the revoked identity refused, after agentmesh revoke started"
	timingClosed  = "revocation: its live connection closed, after agentmesh revoke started"
	timingDrain   = "drain: old credential's connection closed later than overlap + drain_grace"
)

// revocationTiming revokes the client proxy's identity while a live connection and a
// stream of new ones cross the pair, and measures when each stops working (the target
// of e2e TestRevocation: both within 1 s).
func revocationTiming(ctx context.Context, ca *meshCA, dir string, echoPort int) []timing {
	top, err := startMesh(ctx, ca, dir, mode{name: "revocation", kind: kindMesh}, echoPort)
	if err != nil {
		return failed(err, timingRefused, timingClosed)
	}
	defer top.stop()
	long, err := dialEcho(top.addr)
	if err != nil {
		return failed(err, timingRefused, timingClosed)
	}
	defer long.Close()
	closed := make(chan time.Time, 1)
	go func() {
		_, _ = io.Copy(io.Discard, long) // returns once the mesh closes the connection
		closed <- time.Now()
	}()
	// New connections keep crossing the pair, so that the server proxy shows when it
	// starts refusing the identity; their own results do not matter.
	probeCtx, stopProbe := context.WithCancel(ctx)
	defer stopProbe()
	go func() {
		for probeCtx.Err() == nil {
			if c, err := dialEcho(top.addr); err == nil {
				c.Close()
			}
			time.Sleep(10 * time.Millisecond) // pace the probe; not a wait on a result
		}
	}()

	started := time.Now()
	out, err := exec.CommandContext(ctx, ca.binary, "revoke", "--state", ca.state, top.client.id,
		"--reason", "benchmark").CombinedOutput()
	if err != nil {
		return failed(fmt.Errorf("agentmesh revoke: %w: %s", err, strings.TrimSpace(string(out))), timingRefused, timingClosed)
	}
	ts := []timing{{what: timingRefused, limit: time.Second}, {what: timingClosed, limit: time.Second}}
	select {
	case at := <-closed:
		ts[1].value = at.Sub(started)
	case <-time.After(30 * time.Second):
		ts[1].err = errors.New("not within 30 s")
	}
	// Whichever proxy applies the deny-list first refuses: the server the client's
	// certificate (inbound, revoked), or the client its own (outbound, revoked, or no_svid
	// once its rotator dropped it: an error, not a refusal of a peer).
	at, err := pollAudits(map[string]func(auditRecord) bool{
		filepath.Join(top.server.state, "audit.log"): func(r auditRecord) bool {
			return r.Type == "handshake" && r.Direction == "inbound" && r.Result == "refused" && r.Reason == "revoked" &&
				r.PeerID == top.client.id && !r.Time.Before(started)
		},
		filepath.Join(top.client.state, "audit.log"): func(r auditRecord) bool {
			return r.Type == "handshake" && r.Direction == "outbound" && r.Result != "ok" &&
				(r.Reason == "revoked" || r.Reason == "no_svid") && !r.Time.Before(started)
		},
	})
	if err != nil {
		ts[0].err = err
	} else {
		ts[0].value = at.Time.Sub(started)
	}
	return ts
}

// drainTiming rotates the client proxy's identity while a connection on the old
// credential is open, and measures how long after overlap + drain_grace the proxy
// closed it, from its audit records (the target of e2e TestKeyLifecycle: within 2 s).
func drainTiming(ctx context.Context, ca *meshCA, dir string, echoPort int) []timing {
	const overlap, grace = time.Second, time.Second
	m := mode{name: "drain", kind: kindMesh, config: fmt.Sprintf("rotation:\n  overlap: %s\n  drain_grace: %s\n", overlap, grace)}
	top, err := startMesh(ctx, ca, dir, m, echoPort)
	if err != nil {
		return failed(err, timingDrain)
	}
	defer top.stop()
	long, err := dialEcho(top.addr)
	if err != nil {
		return failed(err, timingDrain)
	}
	defer long.Close()
	if err := top.client.rotate(ctx, ca.binary); err != nil {
		return failed(err, timingDrain)
	}
	_ = long.SetReadDeadline(time.Now().Add(overlap + grace + 30*time.Second))
	if _, err := io.Copy(io.Discard, long); errors.Is(err, os.ErrDeadlineExceeded) {
		return failed(errors.New("the old credential's connection was not drained within 30 s"), timingDrain)
	}
	inOverlap, err := pollAudit(filepath.Join(top.client.state, "audit.log"), func(r auditRecord) bool {
		return r.Type == "key_state" && r.Key == "svid" && r.To == "overlap"
	})
	if err != nil {
		return failed(err, timingDrain)
	}
	drained, err := pollAudit(filepath.Join(top.client.state, "audit.log"), func(r auditRecord) bool {
		return r.Type == "connection" && r.Reason == "drained" && r.LocalSerial == inOverlap.Serial
	})
	if err != nil {
		return failed(err, timingDrain)
	}
	return []timing{{what: timingDrain, value: drained.Time.Sub(inOverlap.Time) - overlap - grace, limit: 2 * time.Second}}
}

// auditRecord holds the fields of an audit record that the timing scenarios read.
type auditRecord struct {
	Time                                             time.Time
	Type, Direction, Result, Reason, Key, To, Serial string
	PeerID                                           string `json:"peer_id"`
	LocalSerial                                      string `json:"local_serial"`
}

// pollAudits returns the earliest record, across the audit logs given, for which the
// log's match holds, reading them again until one is there or 30 s have passed.
func pollAudits(logs map[string]func(auditRecord) bool) (auditRecord, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		var first auditRecord
		var errs []error
		for path, match := range logs {
			r, err := findRecord(path, match)
			switch {
			case err != nil:
				errs = append(errs, err)
			case first.Time.IsZero() || r.Time.Before(first.Time):
				first = r
			}
		}
		if !first.Time.IsZero() {
			return first, nil
		}
		if time.Now().After(deadline) {
			return auditRecord{}, errors.Join(errs...)
		}
		time.Sleep(100 * time.Millisecond) // the polling interval
	}
}

// pollAudit returns the first record of the audit log at path for which match holds,
// reading the log again until one is there (records are appended as events end) or
// 30 s have passed.
func pollAudit(path string, match func(auditRecord) bool) (auditRecord, error) {
	return pollAudits(map[string]func(auditRecord) bool{path: match})
}

func findRecord(path string, match func(auditRecord) bool) (auditRecord, error) {
	f, err := os.Open(path)
	if err != nil {
		return auditRecord{}, err
	}
	defer func() { _ = f.Close() }() // read only
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var r auditRecord
		if json.Unmarshal(sc.Bytes(), &r) == nil && match(r) {
			return r, nil
		}
	}
	if err := sc.Err(); err != nil {
		return auditRecord{}, err
	}
	return auditRecord{}, fmt.Errorf("%s: no such record within 30 s", path)
}

// dialEcho opens a connection to the echo server through addr and checks that one byte
// comes back.
func dialEcho(addr string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	buf := []byte{modeEcho, 'x'}
	if _, err = c.Write(buf); err == nil {
		_, err = io.ReadFull(c, buf[:1])
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	_ = c.SetDeadline(time.Time{})
	return c, nil
}
