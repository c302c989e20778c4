package e2e

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/ca"
)

// TestAddressClaims: the CA runs on host a; host b's proxy registers first, from its
// own address, and the CA learns that address as b's claim. Host m's proxy, whose
// config advertises b's address, is refused: an address_claim record on the CA with
// m's SPIFFE ID, b's address and b as the owner, counted in the CA's metric, while the
// directory still maps the address to b. An operator cannot give m a prefix
// overlapping b's. After a restart of the CA with both proxies stopped (an empty
// directory), m is refused again from claims.json, and b comes back without being
// learnt anew.
func TestAddressClaims(t *testing.T) {
	requireE2E(t)
	requireRoot(t)
	l := newLAN(t)
	a, b, m := l.add("a"), l.add("b"), l.add("m")
	const metricsURL = "http://127.0.0.1:15090/metrics"
	authority := startCAOn(t, a.host, a.ip+":9443", time.Minute, "--metrics", "127.0.0.1:15090")
	caAudit := filepath.Join(authority.state, "audit.log")
	hostB, hostM := "spiffe://"+trustDomain+"/host/b", "spiffe://"+trustDomain+"/host/m"
	advertise := func(ip string) string { return fmt.Sprintf("directory:\n  advertise: [%s]\n  heartbeat: 1s\n", ip) }

	pb := startProxyOn(t, b.host, authority, "b", "0.0.0.0:15008", "127.0.0.1:15020", nil, nil, advertise(b.ip))
	learnt := map[string]string{"type": "address_claim", "action": "learn", "result": "ok", "host": hostB, "address": b.ip}
	awaitRecordSince(t, "ca", caAudit, learnt, time.Time{}, 60*time.Second)

	refusal := map[string]string{"type": "address_claim", "result": "refused", "reason": "foreign_address",
		"initiator": hostM, "host": hostM, "address": b.ip, "owner": hostB, "peer_addr": m.ip}
	pm := startProxyOn(t, m.host, authority, "m", "0.0.0.0:15008", "127.0.0.1:15020", nil, nil, advertise(b.ip))
	enrolled := time.Now()
	refused := awaitRecordSince(t, "ca", caAudit, refusal, time.Time{}, 60*time.Second)
	t.Logf("refused %s after m enrolled: %v", sinceRecord(refused, enrolled), refused["error"])
	series := `agentmesh_ca_address_claims_refused_total{reason="foreign_address"}`
	if n := metricAt(t, a, metricsURL, series); n < 1 {
		t.Errorf("%s = %v, want at least 1", series, n)
	}
	if got := owner(t, authority, b.ip); got != hostB {
		t.Errorf("the directory maps %s to %q, want %s", b.ip, got, hostB)
	}

	// An overlapping prefix is refused at register time; a malformed one on the command line.
	if _, errOut, err := runCmdOut(t, binary, "register", hostM, "--addr", l.net+".0/24", "--state", authority.state); err == nil ||
		!strings.Contains(errOut, "409") || !strings.Contains(errOut, hostB) {
		t.Errorf("register m with a prefix over b's address: %v\n%s", err, errOut)
	}
	awaitRecordSince(t, "ca", caAudit, map[string]string{"type": "address_claim", "action": "register", "result": "refused",
		"reason": "overlap", "host": hostM}, time.Time{}, 10*time.Second)
	if _, errOut, err := runCmdOut(t, binary, "register", hostM, "--addr", m.ip+"/24", "--state", authority.state); err == nil {
		t.Errorf("register m with host bits set was accepted\n%s", errOut)
	}
	list, _, err := runCmdOut(t, binary, "list", "--state", authority.state)
	if err != nil || !strings.Contains(list, hostB) || !strings.Contains(list, b.ip+"/32") || !strings.Contains(list, "learnt from "+b.ip) {
		t.Errorf("list: %v\n%s", err, list)
	}

	// Both proxies stop and the CA restarts on its state: its directory is empty, so
	// only the claims in claims.json stand between m and b's address.
	for _, p := range []*meshProxy{pm, pb} {
		if err := p.stop(); err != nil {
			t.Logf("%s: %v", p.name, err)
		}
	}
	restarted := time.Now()
	authority.restart(t)
	startProxyOn(t, m.host, authority, "m", "0.0.0.0:15008", "127.0.0.1:15020", nil, nil, advertise(b.ip))
	again := awaitRecordSince(t, "ca", caAudit, refusal, restarted, 60*time.Second)
	t.Logf("refused again %s after the CA restart began", sinceRecord(again, restarted))
	if n := metricAt(t, a, metricsURL, series); n < 1 {
		t.Errorf("after the restart %s = %v, want at least 1", series, n)
	}
	if got := owner(t, authority, b.ip); got != "" {
		t.Errorf("after the restart the directory maps %s to %s", b.ip, got)
	}
	startProxyOn(t, b.host, authority, "b", "0.0.0.0:15008", "127.0.0.1:15020", nil, nil, advertise(b.ip))
	waitFor(t, 60*time.Second, "b back in the restarted CA's directory", func() error {
		if got := owner(t, authority, b.ip); got != hostB {
			return fmt.Errorf("%s is mapped to %q", b.ip, got)
		}
		return nil
	})
	learnings := 0
	for _, r := range readAudit(t, caAudit) {
		if matches(r, learnt) {
			learnings++
		}
	}
	if learnings != 1 {
		t.Errorf("b's claim was learnt %d times, want once: the restart kept it", learnings)
	}
}

// owner is the SPIFFE ID of the proxy the CA's directory maps addr to ("" for none).
func owner(t *testing.T, authority *meshCA, addr string) string {
	t.Helper()
	doc, err := ca.RequestDirectory(t.Context(), authority.state)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range doc.Peers {
		if slices.Contains(p.Addresses, netip.MustParseAddr(addr)) {
			return p.SPIFFEID.String()
		}
	}
	return ""
}

// sinceRecord is how long after t the audit record r was written.
func sinceRecord(r map[string]any, t time.Time) time.Duration {
	ts, err := time.Parse(time.RFC3339Nano, fmt.Sprint(r["time"]))
	if err != nil {
		return 0
	}
	return ts.Sub(t)
}
