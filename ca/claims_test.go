package ca

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/metrictest"
	"github.com/agentmesh/agentmesh/meshapi"
)

func prefixes(s ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(s))
	for i, p := range s {
		out[i] = netip.MustParsePrefix(p)
	}
	return out
}

func TestParseClaimPrefix(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		in   string
		want string // "" when refused
	}{
		{"10.0.0.0/24", "10.0.0.0/24"},
		{"10.0.0.1", "10.0.0.1/32"},
		{"fd00::/64", "fd00::/64"},
		{"fd00::1", "fd00::1/128"},
		{"::ffff:10.0.0.1", "10.0.0.1/32"},
		{"::ffff:10.0.0.0/120", "10.0.0.0/24"},
		{"10.0.0.1/24", ""},    // host bits set
		{"10.0.0.0/33", ""},    // out of range
		{"0.0.0.0/0", ""},      // everything
		{"::/0", ""},           // everything
		{"224.0.0.0/4", ""},    // multicast
		{"0.0.0.0", ""},        // unspecified
		{"fe80::1%eth0", ""},   // zoned
		{"::ffff:0:0/90", ""},  // mapped and not
		{"host-a.mesh", ""},    // a name
		{"10.0.0.1:15008", ""}, // a port
		{"", ""},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseClaimPrefix(tc.in)
			switch {
			case tc.want == "" && err == nil:
				t.Fatalf("ParseClaimPrefix(%q) = %v, want an error", tc.in, got)
			case tc.want == "" && !errors.Is(err, ErrInvalidRequest):
				t.Fatalf("ParseClaimPrefix(%q): %v, want ErrInvalidRequest", tc.in, err)
			case tc.want != "" && (err != nil || got.String() != tc.want):
				t.Fatalf("ParseClaimPrefix(%q) = %v, %v, want %s", tc.in, got, err, tc.want)
			}
		})
	}
}

// The pure rules: a claim allows its prefixes and refuses the rest, naming the host a
// foreign address belongs to; what a first registration teaches depends on where it
// came from; claims of two hosts never overlap.
func TestClaimSet(t *testing.T) {
	t.Parallel()
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	idC := spiffeid.RequireFromPath(testTD, "/host/c")
	a := meshapi.HostClaim{Host: idA, Prefixes: prefixes("10.0.0.0/24", "fd00::/64"), Source: meshapi.ClaimAdmin}
	set, err := newClaimSet([]meshapi.HostClaim{a, {Host: idB, Prefixes: prefixes("10.0.1.7/32"), Source: meshapi.ClaimLearnt}})
	if err != nil {
		t.Fatal(err)
	}
	reason := func(err error) claimReason {
		var ce *claimError
		if !errors.As(err, &ce) {
			return ""
		}
		return ce.reason
	}

	if err := set.check(a, addrs("10.0.0.9", "fd00::9")); err != nil {
		t.Errorf("addresses inside a's claim: %v", err)
	}
	err = set.check(a, addrs("10.0.0.9", "10.0.1.7"))
	var ce *claimError
	if !errors.Is(err, ErrClaimConflict) || !errors.As(err, &ce) || ce.reason != reasonForeignAddress || ce.owner != idB || ce.addr != "10.0.1.7" {
		t.Errorf("b's address claimed by a: %v", err)
	}
	if err := set.check(a, addrs("192.0.2.1")); !errors.Is(err, ErrClaimNotAllowed) || reason(err) != reasonOutsideClaim {
		t.Errorf("an address of nobody's claimed by a: %v", err)
	}

	for _, tc := range []struct {
		name  string
		from  string
		addrs []string
		want  []netip.Prefix
		fail  claimReason
	}{
		{"from the advertised address", "192.0.2.5", []string{"192.0.2.5"}, prefixes("192.0.2.5/32"), ""},
		{"from an address not advertised", "192.0.2.5", []string{"192.0.2.6"}, nil, reasonUnverified},
		{"advertising more than the source", "192.0.2.5", []string{"192.0.2.5", "192.0.2.6"}, nil, reasonUnverified},
		{"from loopback: the advertised addresses", "127.0.0.1", []string{"192.0.2.6", "fd01::6"}, prefixes("192.0.2.6/32", "fd01::6/128"), ""},
		{"from ::1: the advertised addresses", "::1", []string{"192.0.2.6"}, prefixes("192.0.2.6/32"), ""},
		{"another host's address, from it", "10.0.1.7", []string{"10.0.1.7"}, nil, reasonForeignAddress},
		{"another host's address, from loopback", "127.0.0.1", []string{"192.0.2.6", "10.0.0.3"}, nil, reasonForeignAddress},
		{"another host's address, from elsewhere", "192.0.2.5", []string{"10.0.0.3"}, nil, reasonForeignAddress},
		{"no source address", "", []string{"192.0.2.5"}, nil, reasonUnverified},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var from netip.Addr
			if tc.from != "" {
				from = netip.MustParseAddr(tc.from)
			}
			c, err := set.learn(idC, from, addrs(tc.addrs...), now)
			if tc.fail != "" {
				if reason(err) != tc.fail {
					t.Fatalf("learn: %+v, %v, want %s", c, err, tc.fail)
				}
				return
			}
			if err != nil || !slices.Equal(c.Prefixes, tc.want) || c.Source != meshapi.ClaimLearnt || c.From != from || !c.At.Equal(now) {
				t.Fatalf("learn: %+v, %v, want %v", c, err, tc.want)
			}
			if _, err := set.with(c); err != nil {
				t.Fatalf("with the learnt claim: %v", err)
			}
		})
	}

	if _, err := set.with(meshapi.HostClaim{Host: idC, Prefixes: prefixes("10.0.0.128/25"), Source: meshapi.ClaimAdmin}); reason(err) != reasonOverlap ||
		!errors.Is(err, ErrClaimConflict) {
		t.Errorf("a prefix inside a's: %v", err)
	}
	if _, err := set.with(meshapi.HostClaim{Host: idC, Prefixes: prefixes("10.0.0.0/8"), Source: meshapi.ClaimAdmin}); reason(err) != reasonOverlap {
		t.Errorf("a prefix around a's: %v", err)
	}
	moved, err := set.with(meshapi.HostClaim{Host: idA, Prefixes: prefixes("10.9.0.0/16"), Source: meshapi.ClaimAdmin})
	if err != nil || !slices.Equal(moved.byHost[idA].Prefixes, prefixes("10.9.0.0/16")) || len(moved.sorted) != 2 {
		t.Fatalf("replacing a's claim: %v", err)
	}
	if err := moved.check(moved.byHost[idB], addrs("10.0.0.1")); err == nil || reason(err) != reasonOutsideClaim {
		t.Errorf("a's former address is nobody's: %v", err)
	}
	if _, _, err := set.without(idC); !errors.Is(err, ErrEntryNotFound) {
		t.Errorf("without a host that has no claim: %v", err)
	}
}

// newClaimSet's sweep finds an overlap of two hosts' prefixes wherever it hides: nested
// in a prefix of the same host, across families, at the same first address.
func TestClaimSetDisjoint(t *testing.T) {
	t.Parallel()
	idC := spiffeid.RequireFromPath(testTD, "/host/c")
	for _, tc := range []struct {
		name    string
		a, b, c []string
		overlap bool
	}{
		{"disjoint", []string{"10.0.0.0/16", "10.3.0.0/16"}, []string{"10.1.0.0/16"}, []string{"fd00::/64"}, false},
		{"own prefixes nested", []string{"10.0.0.0/8", "10.0.0.0/16", "10.1.2.0/24"}, []string{"11.0.0.0/8"}, nil, false},
		{"inside another's", []string{"10.0.0.0/8"}, []string{"10.2.0.0/16"}, nil, true},
		{"around another's", []string{"10.2.3.4/32"}, []string{"10.2.0.0/16"}, nil, true},
		{"behind a nested own prefix", []string{"10.0.0.0/8", "10.1.0.0/16"}, []string{"10.1.2.0/24"}, nil, true},
		{"after a nested own prefix", []string{"10.0.0.0/8", "10.1.0.0/16"}, []string{"10.200.0.0/16"}, nil, true},
		{"same first address", []string{"10.0.0.0/24"}, []string{"10.0.0.0/25"}, nil, true},
		{"v6 inside", []string{"fd00::/16"}, []string{"10.0.0.0/8"}, []string{"fd00:1::/32"}, true},
		{"equal", []string{"192.0.2.1/32"}, nil, []string{"192.0.2.1/32"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var claims []meshapi.HostClaim
			for _, c := range []struct {
				id spiffeid.ID
				p  []string
			}{{idA, tc.a}, {idB, tc.b}, {idC, tc.c}} {
				if len(c.p) > 0 {
					claims = append(claims, meshapi.HostClaim{Host: c.id, Prefixes: prefixes(c.p...), Source: meshapi.ClaimAdmin})
				}
			}
			_, err := newClaimSet(claims)
			if got := errors.Is(err, ErrClaimConflict); got != tc.overlap {
				t.Fatalf("newClaimSet: %v, want overlap %v", err, tc.overlap)
			}
		})
	}
}

func claimRecords(r *auditRecorder) []audit.AddressClaim { return eventsOf[audit.AddressClaim](r) }

// findClaim returns the last record with action, result and reason.
func findClaim(recs []audit.AddressClaim, action claimAction, result claimResult, reason claimReason) (audit.AddressClaim, bool) {
	for i := len(recs) - 1; i >= 0; i-- {
		if r := recs[i]; r.Action == string(action) && r.Result == string(result) && r.Reason == string(reason) {
			return r, true
		}
	}
	return audit.AddressClaim{}, false
}

// A real CA: a host's first registration teaches its claim (from loopback: the
// addresses it advertises); another host's claim on them is refused with 409, audited
// with the caller and the address, and counted, and the directory keeps the rightful
// owner; the learnt claim is fixed; an operator widens, narrows (the live entry
// outside goes at once) and removes claims, and overlaps and bad prefixes are refused;
// everything survives a restart of the Server.
func TestAddressClaims(t *testing.T) {
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	reg := prometheus.NewRegistry()
	cfg.Audit, cfg.Registerer = rec, reg
	ctx := context.Background()
	first := startCA(t, cfg)
	hcA := httpsClient(t, first, tlsCert(enroll(t, first, idA)))
	hcB := httpsClient(t, first, tlsCert(enroll(t, first, idB)))
	regURL := func(ca *runningCA) string { return ca.URL() + meshapi.Prefix + meshapi.RegisterPath }
	owner := func(addr string) spiffeid.ID {
		t.Helper()
		doc, err := RequestDirectory(ctx, cfg.StateDir)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range doc.Peers {
			if slices.Contains(p.Addresses, netip.MustParseAddr(addr)) {
				return p.SPIFFEID
			}
		}
		return spiffeid.ID{}
	}

	if status, body := do(t, hcA, http.MethodPost, regURL(first), registerBody(15008, "10.0.0.1", "fd00::1")); status != http.StatusOK {
		t.Fatalf("a's first registration: %d %s", status, body)
	}
	learnt := first.HostClaims()
	if len(learnt) != 1 || learnt[0].Host != idA || learnt[0].Source != meshapi.ClaimLearnt ||
		!slices.Equal(learnt[0].Prefixes, prefixes("10.0.0.1/32", "fd00::1/128")) || learnt[0].From != netip.MustParseAddr("127.0.0.1") {
		t.Fatalf("claims after a's first registration: %+v", learnt)
	}
	if r, ok := findClaim(claimRecords(rec), claimActionLearn, claimOK, ""); !ok || r.Host != idA.String() || r.PeerAddr != "127.0.0.1" {
		t.Errorf("learning not audited: %+v", claimRecords(rec))
	}

	t.Run("another host's address is refused, audited and counted", func(t *testing.T) {
		status, body := do(t, hcB, http.MethodPost, regURL(first), registerBody(15008, "10.0.0.2", "10.0.0.1"))
		if status != http.StatusConflict || !strings.Contains(string(body), idA.String()) {
			t.Fatalf("b claiming a's address: %d %s, want 409 naming a", status, body)
		}
		r, ok := findClaim(claimRecords(rec), claimActionLearn, claimRefused, reasonForeignAddress)
		if !ok || r.Initiator != idB.String() || r.Address != "10.0.0.1" || r.Owner != idA.String() || r.CallerSerial == "" {
			t.Errorf("refusal audit record: %+v", claimRecords(rec))
		}
		if got := metrictest.Value(t, reg, metricClaimsRefused, labelReason, string(reasonForeignAddress)); got != 1 {
			t.Errorf("%s{reason=foreign_address} = %v, want 1", metricClaimsRefused, got)
		}
		if got := owner("10.0.0.1"); got != idA {
			t.Errorf("10.0.0.1 belongs to %v in the directory, want a", got)
		}
		if _, ok := slices.BinarySearchFunc(first.HostClaims(), idB, func(c meshapi.HostClaim, id spiffeid.ID) int {
			return strings.Compare(c.Host.String(), id.String())
		}); ok {
			t.Error("the refused registration taught b a claim")
		}
	})

	t.Run("a learnt claim is fixed", func(t *testing.T) {
		status, body := do(t, hcA, http.MethodPost, regURL(first), registerBody(15008, "10.0.0.1", "10.0.0.9"))
		if status != http.StatusForbidden {
			t.Fatalf("a claiming one more address: %d %s, want 403", status, body)
		}
		if _, ok := findClaim(claimRecords(rec), claimActionClaim, claimRefused, reasonOutsideClaim); !ok {
			t.Errorf("no outside_claim record: %+v", claimRecords(rec))
		}
		if got := owner("10.0.0.1"); got != idA {
			t.Errorf("after a's refused heartbeat 10.0.0.1 belongs to %v, want a's entry to stay", got)
		}
	})

	t.Run("an operator sets claims; overlaps and bad prefixes are refused", func(t *testing.T) {
		if _, err := RegisterHost(ctx, cfg.StateDir, idA, prefixes("10.0.0.0/24", "fd00::1/128")); err != nil {
			t.Fatal(err)
		}
		if status, body := do(t, hcA, http.MethodPost, regURL(first), registerBody(15008, "10.0.0.1", "10.0.0.9")); status != http.StatusOK {
			t.Fatalf("a inside its widened claim: %d %s", status, body)
		}
		if _, err := RegisterHost(ctx, cfg.StateDir, idB, prefixes("10.0.0.128/25")); responseStatus(err) != http.StatusConflict {
			t.Errorf("b's prefix inside a's: %v, want 409", err)
		}
		if _, ok := findClaim(claimRecords(rec), claimActionRegister, claimRefused, reasonOverlap); !ok {
			t.Errorf("overlap not audited: %+v", claimRecords(rec))
		}
		for _, body := range []string{
			`{"host":"spiffe://mesh.test/host/b","addresses":["10.0.2.1/24"]}`,
			`{"host":"spiffe://mesh.test/host/b","addresses":["not an address"]}`,
			`{"host":"spiffe://mesh.test/host/b","addresses":[]}`,
			`{"host":"spiffe://mesh.test/agent/x","addresses":["10.0.2.0/24"]}`,
			`{"host":"spiffe://other.test/host/b","addresses":["10.0.2.0/24"]}`,
			`{"host":"spiffe://mesh.test/host/b","addresses":["10.0.2.0/24"],"extra":1}`,
		} {
			_, err := adminRequest(ctx, cfg.StateDir, "register host", http.MethodPost, adminHostsPath, []byte(body), adminMaxBody)
			if responseStatus(err) != http.StatusBadRequest {
				t.Errorf("POST /hosts %s: %v, want 400", body, err)
			}
		}
		if got := metrictest.Value(t, reg, metricClaimsRefused, labelReason, string(reasonInvalidClaim)); got != 6 {
			t.Errorf("%s{reason=invalid} = %v, want 6", metricClaimsRefused, got)
		}
		if _, err := RegisterHost(ctx, cfg.StateDir, idB, prefixes("10.0.1.0/24")); err != nil {
			t.Fatal(err)
		}
	})

	claims := first.HostClaims()
	if err := first.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	path := filepath.Join(cfg.StateDir, fileClaims)
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("%s: %v %v, want mode 0600", path, fi, err)
	}

	cfg.Registerer = prometheus.NewRegistry()
	second := startCA(t, cfg)
	if got := second.HostClaims(); !slices.EqualFunc(got, claims, func(x, y meshapi.HostClaim) bool {
		return x.Host == y.Host && slices.Equal(x.Prefixes, y.Prefixes) && x.Source == y.Source && x.From == y.From && x.At.Equal(y.At)
	}) {
		t.Fatalf("claims after restart %+v, want %+v", got, claims)
	}
	hcB = httpsClient(t, second, tlsCert(enroll(t, second, idB)))
	hcA = httpsClient(t, second, tlsCert(enroll(t, second, idA)))
	t.Run("after a restart a foreign claim is still refused", func(t *testing.T) {
		if status, body := do(t, hcB, http.MethodPost, regURL(second), registerBody(15008, "10.0.0.1")); status != http.StatusConflict {
			t.Fatalf("b claiming a's address after a restart: %d %s, want 409", status, body)
		}
		if status, body := do(t, hcB, http.MethodPost, regURL(second), registerBody(15008, "10.0.1.1")); status != http.StatusOK {
			t.Fatalf("b inside its claim: %d %s", status, body)
		}
	})

	t.Run("narrowing a claim drops the live entry outside it", func(t *testing.T) {
		if status, body := do(t, hcA, http.MethodPost, regURL(second), registerBody(15008, "10.0.0.1")); status != http.StatusOK {
			t.Fatalf("a: %d %s", status, body)
		}
		if _, err := RegisterHost(ctx, cfg.StateDir, idA, prefixes("10.0.0.2/32")); err != nil {
			t.Fatal(err)
		}
		if got := owner("10.0.0.1"); !got.IsZero() {
			t.Errorf("10.0.0.1 still belongs to %v after a's claim moved away from it", got)
		}
		if got := owner("10.0.1.1"); got != idB {
			t.Errorf("b's entry was touched: 10.0.1.1 belongs to %v", got)
		}
	})

	t.Run("an unregistered host learns again", func(t *testing.T) {
		if err := UnregisterHost(ctx, cfg.StateDir, idA); err != nil {
			t.Fatal(err)
		}
		if err := UnregisterHost(ctx, cfg.StateDir, idA); responseStatus(err) != http.StatusNotFound {
			t.Errorf("second unregister: %v, want 404", err)
		}
		if status, body := do(t, hcA, http.MethodPost, regURL(second), registerBody(15008, "10.0.0.5")); status != http.StatusOK {
			t.Fatalf("a after its claim was removed: %d %s", status, body)
		}
		hosts, err := ListHosts(ctx, cfg.StateDir)
		if err != nil || len(hosts) != 2 || hosts[0].Host != idA || !slices.Equal(hosts[0].Prefixes, prefixes("10.0.0.5/32")) || hosts[0].Source != meshapi.ClaimLearnt {
			t.Fatalf("ListHosts: %+v, %v", hosts, err)
		}
	})
	if err := second.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}

	requireCorruptRefused(t, cfg, path, map[string]string{
		"not json":        `{"hosts":[`,
		"unknown field":   `{"hosts":[],"extra":1}`,
		"not a host":      `{"hosts":[{"host":"spiffe://mesh.test/agent/x","prefixes":["10.0.0.0/24"],"source":"admin","at":"2030-01-01T00:00:00Z"}]}`,
		"host bits":       `{"hosts":[{"host":"spiffe://mesh.test/host/a","prefixes":["10.0.0.1/24"],"source":"admin","at":"2030-01-01T00:00:00Z"}]}`,
		"unknown source":  `{"hosts":[{"host":"spiffe://mesh.test/host/a","prefixes":["10.0.0.0/24"],"source":"guess","at":"2030-01-01T00:00:00Z"}]}`,
		"no prefixes":     `{"hosts":[{"host":"spiffe://mesh.test/host/a","prefixes":[],"source":"admin","at":"2030-01-01T00:00:00Z"}]}`,
		"unsorted":        `{"hosts":[{"host":"spiffe://mesh.test/host/a","prefixes":["10.0.1.0/24","10.0.0.0/24"],"source":"admin","at":"2030-01-01T00:00:00Z"}]}`,
		"overlap":         `{"hosts":[{"host":"spiffe://mesh.test/host/a","prefixes":["10.0.0.0/16"],"source":"admin","at":"2030-01-01T00:00:00Z"},{"host":"spiffe://mesh.test/host/b","prefixes":["10.0.1.0/24"],"source":"admin","at":"2030-01-01T00:00:00Z"}]}`,
		"host twice":      `{"hosts":[{"host":"spiffe://mesh.test/host/a","prefixes":["10.0.0.0/24"],"source":"admin","at":"2030-01-01T00:00:00Z"},{"host":"spiffe://mesh.test/host/a","prefixes":["10.0.1.0/24"],"source":"admin","at":"2030-01-01T00:00:00Z"}]}`,
		"other trust dom": `{"hosts":[{"host":"spiffe://other.test/host/a","prefixes":["10.0.0.0/24"],"source":"admin","at":"2030-01-01T00:00:00Z"}]}`,
	})
}

// requireCorruptRefused writes each content to path in turn and checks that New then
// fails with an error naming path.
func requireCorruptRefused(t *testing.T, cfg Config, path string, contents map[string]string) {
	t.Helper()
	for name, content := range contents {
		t.Run(name, func(t *testing.T) {
			if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			srv, err := New(context.Background(), cfg)
			if err == nil {
				_ = srv.Close()
				t.Fatalf("New with a corrupt %s succeeded", filepath.Base(path))
			}
			if !strings.Contains(err.Error(), path) {
				t.Errorf("New: %v, does not name %s", err, path)
			}
		})
	}
}

// What `agentmesh register HOST --addr` accepts: a prefix, or one address.
func ExampleParseClaimPrefix() {
	for _, s := range []string{"10.0.0.0/24", "10.0.0.7", "::ffff:192.0.2.1", "10.0.0.1/24"} {
		p, err := ParseClaimPrefix(s)
		fmt.Println(p, err != nil)
	}
	// Output:
	// 10.0.0.0/24 false
	// 10.0.0.7/32 false
	// 192.0.2.1/32 false
	// invalid Prefix true
}
