package e2e

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/pemutil"
	"golang.org/x/mod/sumdb/note"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

// TestAuditWitness: a CA and two proxies that sign a checkpoint of their audit logs
// every second. The CA cosigns every proxy's checkpoints, and the proxies the CA's. A
// proxy whose log is rewritten consistently while it is stopped (the chain recomputed,
// a fresh checkpoint signed with its own key) is refused at its next checkpoint: the CA
// records it, counts it and shows the log inconsistent, and `audit verify --witness`
// names the records rewritten. A CA whose log is rewritten so is refused by the proxies
// in turn. A proxy whose log is idle still checks in; one that is stopped turns stale.
// An inclusion proof of the CA's record of a revocation, against a CA checkpoint a
// proxy cosigned, checks offline. It prints the checkpoint lag measured.
func TestAuditWitness(t *testing.T) {
	requireE2E(t)
	metrics := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	authority := startCAOn(t, host{}, fmt.Sprintf("127.0.0.1:%d", freePort(t)), 10*time.Minute,
		"--metrics", metrics, "--audit-checkpoint-interval", "1s", "--witness-stale-after", staleAfter.String())
	w := newWitnessView(t, authority, "http://"+metrics+"/metrics")
	const every = "audit:\n  checkpoint_interval: 1s\n"
	a := startProxy(t, authority, "a", nil, nil, every)
	b := startProxy(t, authority, "b", nil, nil, every)
	w.awaitWitnessed(t, a, 1)
	w.awaitWitnessed(t, b, 1)

	// A revocation: one record in the CA's log, one deny-list record in each proxy's.
	victim := "spiffe://" + trustDomain + "/agent/victim"
	enrollAs(t, authority, victim)
	if _, errOut, err := runCmd(t.Context(), "revoke", "--state", authority.state, victim, "--reason", "e2e"); err != nil {
		t.Fatalf("revoke: %v\n%s", err, errOut)
	}
	revoked := awaitRecordIn(t, "ca", authority.auditPath(), map[string]string{"type": "revocation", "spiffe_id": victim, "result": "ok"}, time.Minute)
	version, err := strconv.ParseUint(fmt.Sprint(revoked["list_version"]), 10, 64)
	if err != nil {
		t.Fatalf("revocation record without its deny-list version: %v", revoked)
	}
	lag := w.measureLag(t, a, version)
	denied := awaitDenyList(t, b, version, time.Minute)
	w.awaitWitnessed(t, b, recordSeq(t, denied))

	// The CA's log, witnessed by the proxies: its revocation record is in a CA
	// checkpoint that a proxy cosigned, and that proves it offline.
	caLag := w.proveCARecord(t, recordSeq(t, revoked)-1, recordTime(t, revoked))
	t.Logf("checkpoint lag: a proxy's record is in a checkpoint the CA cosigned %v after it was written "+
		"(checkpoint_interval 1s; agentmesh_audit_checkpoint_lag_seconds read then: %vs); the CA's record in a CA checkpoint a proxy cosigned after %v",
		lag.observed.Round(time.Millisecond), lag.gauge, caLag.Round(time.Millisecond))
	w.awaitCALogCosigned(t, a, b)

	b, from, to := w.rewriteProxyLog(t, b, recordSeq(t, denied)-1)
	w.rewriteCALog(t, a, recordSeq(t, revoked)-1)
	w.checkLiveness(t, a)

	// verify --witness names the records rewritten, and passes on a's log, untouched.
	if err := b.stop(); err != nil {
		t.Fatalf("stop b: %v", err)
	}
	out, errOut, err := runCmd(t.Context(), "audit", "verify", b.auditPath(), "--witness", authority.url, "--root", authority.root)
	if want := fmt.Sprintf("[%d, %d)", from, to); err == nil || !strings.Contains(out+errOut, want) {
		t.Errorf("audit verify --witness of b's rewritten log: %v, want a failure naming %s:\n%s%s", err, want, out, errOut)
	}
	if out, errOut, err := runCmd(t.Context(), "audit", "verify", a.auditPath(), "--witness", authority.url, "--root", authority.root); err != nil {
		t.Errorf("audit verify --witness of a's log: %v\n%s%s", err, out, errOut)
	}
}

// staleAfter is the CA's --witness-stale-after in TestAuditWitness: five checkpoint
// intervals.
const staleAfter = 5 * time.Second

// rewriteProxyLog stops p, rewrites its log from the record at index on, consistently
// (the chain recomputed, the derived files removed, so that p signs a fresh checkpoint
// of the new log with its own key when it starts again; the cosigned checkpoint it
// keeps makes it prove the new log from the CA's), and starts it again: the CA refuses
// its next checkpoint, records and counts it, and keeps the one it held. It returns the
// restarted proxy and the range of records verify must name.
func (w *witnessView) rewriteProxyLog(t *testing.T, p *meshProxy, index uint64) (*meshProxy, uint64, uint64) {
	t.Helper()
	if err := p.stop(); err != nil {
		t.Fatalf("stop %s: %v", p.name, err)
	}
	held := w.log(t, p)
	from, to := rewrittenRange(t, held, index)
	rewriteLog(t, p.auditPath(), index)
	inconsistentBefore := w.caMetric(t, "agentmesh_ca_audit_checkpoints_total", `result="inconsistent"`)
	p = restart(t, p)
	awaitMetric(t, p, "agentmesh_audit_checkpoints_total", func(v float64) bool { return v >= 1 }, time.Minute, `result="refused"`)
	waitFor(t, time.Minute, "the CA counting "+p.name+"'s log inconsistent", func() error {
		got := w.caMetric(t, "agentmesh_ca_audit_checkpoints_total", `result="inconsistent"`)
		logs := w.caMetric(t, "agentmesh_ca_audit_witnessed_logs", `state="inconsistent"`)
		if got <= inconsistentBefore || logs != 1 {
			return fmt.Errorf("inconsistent checkpoints %v (before %v), inconsistent logs %v", got, inconsistentBefore, logs)
		}
		return nil
	})
	awaitRecordIn(t, "ca", w.ca.auditPath(), map[string]string{"type": "witness", "action": "checkpoint",
		"result": "refused", "reason": "inconsistent", "origin": w.origin(p), "initiator": p.id}, time.Minute)
	if got := w.log(t, p); got.State != "inconsistent" || got.Latest != held.Latest {
		t.Errorf("the CA's view of %s: state %q, latest changed %t; want inconsistent and the one it held", p.name, got.State, got.Latest != held.Latest)
	}
	return p, from, to
}

// awaitCALogCosigned waits until every proxy holds a CA checkpoint it cosigned, under
// the CA's key, and none found the CA's log inconsistent.
func (w *witnessView) awaitCALogCosigned(t *testing.T, proxies ...*meshProxy) {
	t.Helper()
	caKey := w.log(t, proxies[0]).WitnessKeys
	for _, p := range proxies {
		waitFor(t, time.Minute, p.name+" keeping a CA checkpoint it cosigned", func() error {
			var st struct {
				WitnessKey string `json:"witness_key"`
				Cosigned   string `json:"cosigned"`
			}
			b, err := os.ReadFile(filepath.Join(p.dir, "ca-audit.json"))
			if err == nil {
				err = json.Unmarshal(b, &st)
			}
			switch {
			case err != nil:
				return err
			case len(caKey) != 1 || st.WitnessKey != caKey[0] || st.Cosigned == "":
				return fmt.Errorf("pinned %q, cosigned %q; the CA's key is %v", st.WitnessKey, st.Cosigned, caKey)
			}
			return nil
		})
		if v := metricValue(t, p, "agentmesh_proxy_ca_audit_inconsistent"); v != 0 {
			t.Errorf("%s: agentmesh_proxy_ca_audit_inconsistent = %v", p.name, v)
		}
	}
}

// rewriteCALog stops the CA, rewrites its log from the record at index on as
// rewriteProxyLog does, and starts it again: its next checkpoint does not extend the
// one p cosigned, and p refuses it, with an audit record and its metric.
func (w *witnessView) rewriteCALog(t *testing.T, p *meshProxy, index uint64) {
	t.Helper()
	if err := w.ca.stop(); err != nil {
		t.Fatalf("stop the ca: %v", err)
	}
	rewriteLog(t, w.ca.auditPath(), index)
	w.ca.start(t, t, "the ca with its log rewritten")
	awaitMetricValue(t, p, "agentmesh_proxy_ca_audit_inconsistent", 1, time.Minute)
	awaitRecord(t, p, map[string]string{"type": "ca_audit_refused", "reason": "inconsistent",
		"origin": meshapi.CAAuditOrigin(spiffeid.RequireTrustDomainFromString(trustDomain))}, time.Minute)
}

// checkLiveness: p, whose log has not grown for seconds, still checks in with the CA;
// stopped, it turns stale.
func (w *witnessView) checkLiveness(t *testing.T, p *meshProxy) {
	t.Helper()
	if got := w.log(t, p); got.State != "ok" || time.Since(got.LastSeen) > staleAfter {
		t.Errorf("%s, idle: state %q, last seen %v ago; want ok", p.name, got.State, time.Since(got.LastSeen))
	}
	if err := p.stop(); err != nil {
		t.Fatalf("stop %s: %v", p.name, err)
	}
	waitFor(t, time.Minute, p.name+" stale at the CA", func() error {
		wl, err := w.get(w.origin(p))
		if err != nil {
			return err
		}
		if stale := w.caMetric(t, "agentmesh_ca_audit_witnessed_logs", `state="stale"`); wl.State != "stale" || stale != 1 {
			return fmt.Errorf("state %q, stale logs %v", wl.State, stale)
		}
		return nil
	})
}

// witnessView reads what the CA witnessed: its public witness API and its metrics.
type witnessView struct {
	ca      *meshCA
	metrics string
	hc      *http.Client
}

func newWitnessView(t *testing.T, ca *meshCA, metrics string) *witnessView {
	t.Helper()
	roots, err := pemutil.ReadCertificateBundle(ca.root)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	return &witnessView{ca: ca, metrics: metrics, hc: &http.Client{Timeout: 10 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}}
}

func (w *witnessView) origin(p *meshProxy) string {
	return meshapi.AuditOrigin(spiffeid.RequireFromString(p.id))
}

// get answers what the CA holds of origin's log, without a client certificate.
func (w *witnessView) get(origin string) (meshapi.WitnessedLog, error) {
	return meshapi.FetchWitnessedLog(context.Background(), w.hc, w.ca.url, origin)
}

func (w *witnessView) log(t *testing.T, p *meshProxy) meshapi.WitnessedLog {
	t.Helper()
	wl, err := w.get(w.origin(p))
	if err != nil {
		t.Fatal(err)
	}
	return wl
}

// cosignedSize is the size of wl's latest checkpoint when its writer and every witness
// key signed it, else an error.
func cosignedSize(wl meshapi.WitnessedLog, msg string) (uint64, error) {
	var vs []note.Verifier
	for _, k := range append([]string{wl.Key}, wl.WitnessKeys...) {
		v, err := audit.ParseVerifierKey(k)
		if err != nil {
			return 0, err
		}
		vs = append(vs, v)
	}
	if len(vs) < 2 {
		return 0, errors.New("no witness key")
	}
	_, c, err := audit.OpenCheckpoint([]byte(msg), vs...)
	return c.Size, err
}

// awaitWitnessed waits until the CA holds a checkpoint of p's log of at least size
// records, cosigned, and p holds it too.
func (w *witnessView) awaitWitnessed(t *testing.T, p *meshProxy, size uint64) {
	t.Helper()
	waitFor(t, time.Minute, fmt.Sprintf("%s's log witnessed up to %d records", p.name, size), func() error {
		wl, err := w.get(w.origin(p))
		if err != nil {
			return err
		}
		got, err := cosignedSize(wl, wl.Latest)
		switch {
		case err != nil:
			return err
		case wl.State != "ok" || got < size:
			return fmt.Errorf("state %q, size %d", wl.State, got)
		}
		held, err := os.ReadFile(p.auditPath() + ".cosigned")
		if err != nil {
			return err
		}
		if kept, err := cosignedSize(wl, string(held)); err != nil {
			return fmt.Errorf("the proxy's cosigned checkpoint: %w", err)
		} else if kept < size {
			return fmt.Errorf("the proxy keeps a cosigned checkpoint of size %d", kept)
		}
		return nil
	})
}

// checkpointLag is how long after it was written a record was in a cosigned checkpoint.
type checkpointLag struct {
	observed time.Duration
	gauge    float64
}

// measureLag waits for p's record of the deny-list version to be in a checkpoint the
// CA cosigned, polling the proxy's cosigned checkpoint every 20 ms.
func (w *witnessView) measureLag(t *testing.T, p *meshProxy, version uint64) checkpointLag {
	t.Helper()
	r := awaitDenyList(t, p, version, time.Minute)
	seq, written := recordSeq(t, r), recordTime(t, r)
	var lag checkpointLag
	waitForEvery(t, 20*time.Millisecond, time.Minute, fmt.Sprintf("%s: record %d in a cosigned checkpoint", p.name, seq), func() error {
		b, err := os.ReadFile(p.auditPath() + ".cosigned")
		if err != nil {
			return err
		}
		c, err := audit.UnverifiedCheckpoint(b)
		if err != nil {
			return err
		}
		if c.Size < seq {
			return fmt.Errorf("cosigned checkpoint of size %d", c.Size)
		}
		lag.observed = time.Since(written)
		return nil
	})
	lag.gauge = metricValue(t, p, "agentmesh_audit_checkpoint_lag_seconds")
	return lag
}

func (w *witnessView) caMetric(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	v, err := scrapeMetric(w.metrics, name, labels...)
	if err != nil && !errors.Is(err, errNoMetric) {
		t.Fatal(err)
	}
	return v
}

// proveCARecord waits until a proxy cosigned a CA checkpoint holding the CA's record
// at index, proves the record against it with `audit prove` and checks the proof with
// `audit check-proof` and the keys of the CA and of that proxy; a proof whose record
// was altered fails the check. It returns how long after written the record was so
// witnessed.
func (w *witnessView) proveCARecord(t *testing.T, index uint64, written time.Time) time.Duration {
	t.Helper()
	origin := meshapi.CAAuditOrigin(spiffeid.RequireTrustDomainFromString(trustDomain))
	var (
		latest string
		keys   []string
		lag    time.Duration
	)
	waitFor(t, time.Minute, "a CA checkpoint holding the revocation, cosigned by a proxy", func() error {
		wl, err := w.get(origin)
		if err != nil {
			return err
		}
		for _, k := range wl.WitnessKeys {
			one := wl
			one.WitnessKeys = []string{k}
			if size, err := cosignedSize(one, wl.Latest); err == nil && size > index {
				latest, keys, lag = wl.Latest, []string{wl.Key, k}, time.Since(written)
				return nil
			}
		}
		return fmt.Errorf("latest %q, witness keys %d", wl.Latest, len(wl.WitnessKeys))
	})
	dir := t.TempDir()
	cp := filepath.Join(dir, "ca.cosigned")
	writeFile(t, cp, latest)
	out, errOut, err := runCmd(t.Context(), "audit", "prove", w.ca.auditPath(), "--index", strconv.FormatUint(index, 10), "--checkpoint", cp)
	if err != nil {
		t.Fatalf("audit prove: %v\n%s", err, errOut)
	}
	var proof map[string]any
	if err := json.Unmarshal([]byte(out), &proof); err != nil || !strings.Contains(fmt.Sprint(proof["record"]), `"type":"revocation"`) {
		t.Fatalf("proof %v: %s", err, out)
	}
	check := func(doc string) error {
		path := filepath.Join(dir, "proof.json")
		writeFile(t, path, doc)
		_, errOut, err := runCmd(t.Context(), "audit", "check-proof", path, "--key", keys[0], "--key", keys[1])
		if err != nil {
			return fmt.Errorf("%w: %s", err, errOut)
		}
		return nil
	}
	if err := check(out); err != nil {
		t.Fatalf("audit check-proof of the revocation record: %v", err)
	}
	proof["record"] = strings.Replace(fmt.Sprint(proof["record"]), `"spiffe_id":"`, `"spiffe_id":"x`, 1)
	altered, err := json.Marshal(proof)
	if err != nil {
		t.Fatal(err)
	}
	if err := check(string(altered)); err == nil {
		t.Error("audit check-proof passed a proof of an altered record")
	}
	return lag
}

// rewrittenRange is where verify must find a log rewritten from index on: between the
// last checkpoint the witness accepted below index+1 and the first one above, the
// latest one (not in History) included.
func rewrittenRange(t *testing.T, wl meshapi.WitnessedLog, index uint64) (from, to uint64) {
	t.Helper()
	latest, err := audit.UnverifiedCheckpoint([]byte(wl.Latest))
	if err != nil {
		t.Fatal(err)
	}
	sizes := []uint64{}
	for _, h := range wl.History {
		sizes = append(sizes, h.Size)
	}
	for _, size := range append(sizes, latest.Size) {
		if size > index {
			return from, size
		}
		from = size
	}
	t.Fatalf("the witness holds no checkpoint beyond index %d: %+v, latest %d", index, wl.History, latest.Size)
	return 0, 0
}

var (
	prevField = regexp.MustCompile(`"prev":"[0-9a-f]{64}"`)
	hashField = regexp.MustCompile(`,"hash":"[0-9a-f]{64}"}$`)
)

// rewriteLog alters the record at index of the log at path and recomputes the chain
// from there on, as someone holding the host would: every line stays a valid record. The
// files derived from the log (its stored hashes, its latest checkpoint) are removed, to
// be made again from the new log; its cosigned checkpoint stays.
func rewriteLog(t *testing.T, path string, index uint64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 2<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	_ = f.Close() // read only
	if sc.Err() != nil || uint64(len(lines)) <= index {
		t.Fatalf("read %s: %v, %d records", path, sc.Err(), len(lines))
	}
	var prev string
	for i := index; i < uint64(len(lines)); i++ {
		line := lines[i]
		if i > index {
			line = prevField.ReplaceAllLiteralString(line, `"prev":"`+prev+`"`)
		}
		body := hashField.ReplaceAllLiteralString(line, "}")
		if i == index {
			body = strings.TrimSuffix(body, "}") + `,"note":"nothing to see here"}`
		}
		sum := sha256.Sum256([]byte(body))
		prev = hex.EncodeToString(sum[:])
		lines[i] = strings.TrimSuffix(body, "}") + `,"hash":"` + prev + `"}`
	}
	writeFile(t, path, strings.Join(lines, "\n")+"\n")
	for _, suffix := range []string{".hashes", ".checkpoint"} {
		if err := os.Remove(path + suffix); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
	}
}

// recordSeq is a record's seq.
func recordSeq(t *testing.T, r map[string]any) uint64 {
	t.Helper()
	n, err := strconv.ParseUint(fmt.Sprint(r["seq"]), 10, 64)
	if err != nil {
		t.Fatalf("record seq %v: %v", r["seq"], err)
	}
	return n
}
