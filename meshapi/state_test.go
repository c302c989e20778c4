package meshapi

import (
	"encoding/json"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestDecodeDirectory(t *testing.T) {
	t.Parallel()
	self := spiffeid.RequireFromPath(testTD, "/host/self")
	for _, tc := range []struct {
		name    string
		doc     string
		version uint64
		routes  map[string]string // address -> "id tunnel"; nil: refused
	}{
		{
			name:    "two peers",
			doc:     `{"version":7,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["10.0.0.1","fd00::1"],"tunnel_port":15008,"transports":["tls"]},{"spiffe_id":"spiffe://mesh.test/host/b","addresses":["10.0.0.2"],"tunnel_port":15009,"transports":["tls"]}]}`,
			version: 7,
			routes: map[string]string{
				"10.0.0.1": "spiffe://mesh.test/host/a 10.0.0.1:15008",
				"fd00::1":  "spiffe://mesh.test/host/a [fd00::1]:15008",
				"10.0.0.2": "spiffe://mesh.test/host/b 10.0.0.2:15009",
			},
		},
		{
			name:    "own entry left out",
			doc:     `{"version":3,"peers":[{"spiffe_id":"spiffe://mesh.test/host/self","addresses":["10.0.0.9"],"tunnel_port":15008,"transports":["tls"]}]}`,
			version: 3,
			routes:  map[string]string{},
		},
		{
			name:    "empty directory",
			doc:     `{"version":1,"peers":[]}`,
			version: 1,
			routes:  map[string]string{},
		},
		{
			name:    "unknown sections ignored",
			doc:     `{"version":2,"peers":null,"witness":{"version":9},"future":[1]}`,
			version: 2,
			routes:  map[string]string{},
		},
		{
			name:    "mapped address unmapped",
			doc:     `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["::ffff:10.0.0.1"],"tunnel_port":1}]}`,
			version: 2,
			routes:  map[string]string{"10.0.0.1": "spiffe://mesh.test/host/a 10.0.0.1:1"},
		},
		{name: "no version", doc: `{"peers":[]}`},
		{name: "not json", doc: `<html>`},
		{name: "truncated", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a"`},
		{name: "version not a number", doc: `{"version":"2","peers":[]}`},
		{name: "negative version", doc: `{"version":-2,"peers":[]}`},
		{name: "no id", doc: `{"version":2,"peers":[{"addresses":["10.0.0.1"],"tunnel_port":1}]}`},
		{name: "bad id", doc: `{"version":2,"peers":[{"spiffe_id":"https://mesh.test/host/a","addresses":["10.0.0.1"],"tunnel_port":1}]}`},
		{name: "no port", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["10.0.0.1"]}]}`},
		{name: "port out of range", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["10.0.0.1"],"tunnel_port":65536}]}`},
		{name: "no addresses", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":[],"tunnel_port":1}]}`},
		{name: "empty address", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":[""],"tunnel_port":1}]}`},
		{name: "zoned address", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["fe80::1%eth0"],"tunnel_port":1}]}`},
		{name: "unspecified address", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["0.0.0.0"],"tunnel_port":1}]}`},
		{name: "address listed twice", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["10.0.0.1"],"tunnel_port":1},{"spiffe_id":"spiffe://mesh.test/host/b","addresses":["::ffff:10.0.0.1"],"tunnel_port":1}]}`},
		{name: "malformed own entry", doc: `{"version":2,"peers":[{"spiffe_id":"spiffe://mesh.test/host/self","addresses":[],"tunnel_port":1}]}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			snap, err := DecodeState([]byte(tc.doc), self)
			if tc.routes == nil {
				if err == nil {
					t.Fatalf("accepted: %+v", snap)
				}
				t.Logf("refused: %v", err)
				return
			}
			if err != nil {
				t.Fatalf("refused: %v", err)
			}
			if snap.version != tc.version || len(snap.peers) != len(tc.routes) {
				t.Fatalf("version %d, %d routes; want %d, %d", snap.version, len(snap.peers), tc.version, len(tc.routes))
			}
			for a, want := range tc.routes {
				r, ok := snap.peers[netip.MustParseAddr(a)]
				if got := r.id.String() + " " + r.tunnel; !ok || got != want {
					t.Errorf("%s: %q (%v), want %q", a, got, ok, want)
				}
			}
		})
	}
}

// FuzzDirectoryResponse: directory answers from the network never panic the decoder,
// and an accepted one yields only well-formed routes to other proxies.
func FuzzDirectoryResponse(f *testing.F) {
	self := spiffeid.RequireFromPath(testTD, "/host/self")
	f.Fuzz(func(t *testing.T, b []byte) {
		snap, err := DecodeState(b, self)
		if err != nil {
			return
		}
		if snap.version == 0 {
			t.Fatal("accepted version 0")
		}
		for a, r := range snap.peers {
			if !a.IsValid() || a.Is4In6() || a.Zone() != "" {
				t.Fatalf("route for address %v", a)
			}
			if r.id.IsZero() || r.id == self {
				t.Fatalf("route to %q", r.id)
			}
			host, port, err := net.SplitHostPort(r.tunnel)
			if err != nil || host != a.String() {
				t.Fatalf("tunnel %q for %v: %v", r.tunnel, a, err)
			}
			if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
				t.Fatalf("tunnel port %q", port)
			}
		}
		for a, agents := range snap.agents {
			if !a.IsValid() || a.Is4In6() || a.Zone() != "" || len(agents) == 0 {
				t.Fatalf("agents %v for address %v", agents, a)
			}
			for port, id := range agents {
				if port == 0 || id.IsZero() {
					t.Fatalf("agent %q at port %d of %v", id, port, a)
				}
			}
		}
		for i, e := range snap.entries {
			if e.ID.IsZero() || e.Host.IsZero() || (i > 0 && CompareEntries(snap.entries[i-1], e) >= 0) {
				t.Fatalf("entries %+v", snap.entries)
			}
		}
		if (len(snap.bundle) == 0) != (snap.bundleVersion == "") ||
			(snap.bundle != nil && snap.bundleVersion != BundleVersion(snap.bundle)) {
			t.Fatalf("bundle of %d roots named %q", len(snap.bundle), snap.bundleVersion)
		}
	})
}

// The seed corpus parses as the fuzz target expects: one document per file.
func TestDirectoryFuzzSeeds(t *testing.T) {
	t.Parallel()
	files, err := filepath.Glob(filepath.Join("testdata", "fuzz", "FuzzDirectoryResponse", "*"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no seeds: %v", err)
	}
	accepted := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := DecodeState(corpusBytes(t, b), spiffeid.ID{}); err == nil {
			accepted++
		}
	}
	if accepted == 0 {
		t.Error("no seed is a valid directory")
	}
}

// A directory bigger than the limit is refused rather than truncated.
func TestReadLimited(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		size  int
		limit int64
		ok    bool
	}{
		{"under", 10, 11, true},
		{"at", 11, 11, true},
		{"over", 12, 11, false},
	} {
		b, err := ReadLimited(strings.NewReader(strings.Repeat("x", tc.size)), tc.limit)
		if tc.ok != (err == nil) || (tc.ok && len(b) != tc.size) {
			t.Errorf("%s: %d bytes, %v", tc.name, len(b), err)
		}
	}
}

// The documents the server writes are what the client decodes (keeps the two sides'
// types honest).
func TestDirectoryDocumentJSON(t *testing.T) {
	t.Parallel()
	doc := DirectoryDocument{Version: 1 << 60, Peers: []DirectoryEntry{{
		SPIFFEID: idA, Addresses: addrs("10.0.0.1", "fd00::1"), TunnelPort: 15008,
		Transports: []string{"tls"}, LastHeartbeat: time.Date(2030, 1, 2, 3, 4, 5, 6, time.UTC), BundleVersion: "b",
	}}}
	b, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	const want = `{"version":1152921504606846976,"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["10.0.0.1","fd00::1"],"tunnel_port":15008,"transports":["tls"],"last_heartbeat":"2030-01-02T03:04:05.000000006Z","bundle_version":"b"}]}`
	if string(b) != want {
		t.Errorf("JSON:\n%s\nwant\n%s", b, want)
	}
}

func TestDecodeDirectoryEntries(t *testing.T) {
	t.Parallel()
	self := spiffeid.RequireFromPath(testTD, "/host/self")
	const peers = `"peers":[{"spiffe_id":"spiffe://mesh.test/host/a","addresses":["10.0.0.1","fd00::1"],"tunnel_port":1},` +
		`{"spiffe_id":"spiffe://mesh.test/host/self","addresses":["10.0.0.9"],"tunnel_port":1}]`
	for _, tc := range []struct {
		name    string
		entries string
		agents  map[string]string // address -> "port=id ..."; nil: refused
		ids     []string
	}{
		{
			name:    "agents by host address, own host included",
			entries: `[{"id":"spiffe://mesh.test/agent/y","host":"spiffe://mesh.test/host/a","uid":2,"port":9090},{"id":"spiffe://mesh.test/agent/x","host":"spiffe://mesh.test/host/a","uid":1,"port":8080},{"id":"spiffe://mesh.test/agent/s","host":"spiffe://mesh.test/host/self","uid":1,"port":8080}]`,
			agents:  map[string]string{"10.0.0.1": "8080=x 9090=y", "fd00::1": "8080=x 9090=y", "10.0.0.9": "8080=s"},
			ids:     []string{"s", "x", "y"},
		},
		{
			name:    "no port, or a host without a proxy",
			entries: `[{"id":"spiffe://mesh.test/agent/x","host":"spiffe://mesh.test/host/a","uid":1},{"id":"spiffe://mesh.test/agent/y","host":"spiffe://mesh.test/host/gone","uid":1,"port":80}]`,
			agents:  map[string]string{},
			ids:     []string{"x", "y"},
		},
		{name: "none", entries: `[]`, agents: map[string]string{}},
		{name: "no id", entries: `[{"host":"spiffe://mesh.test/host/a","uid":1}]`},
		{name: "no host", entries: `[{"id":"spiffe://mesh.test/agent/x","uid":1}]`},
		{name: "id twice", entries: `[{"id":"spiffe://mesh.test/agent/x","host":"spiffe://mesh.test/host/a","uid":1},{"id":"spiffe://mesh.test/agent/x","host":"spiffe://mesh.test/host/b","uid":1}]`},
		{name: "port twice", entries: `[{"id":"spiffe://mesh.test/agent/x","host":"spiffe://mesh.test/host/a","uid":1,"port":80},{"id":"spiffe://mesh.test/agent/y","host":"spiffe://mesh.test/host/a","uid":2,"port":80}]`},
		{name: "bad id", entries: `[{"id":"spiffe://mesh.test/agent/x/","host":"spiffe://mesh.test/host/a","uid":1}]`},
		{name: "port out of range", entries: `[{"id":"spiffe://mesh.test/agent/x","host":"spiffe://mesh.test/host/a","uid":1,"port":65536}]`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			snap, err := DecodeState([]byte(`{"version":2,`+peers+`,"entries":`+tc.entries+`}`), self)
			if tc.agents == nil {
				if err == nil {
					t.Fatalf("accepted: %+v", snap)
				}
				t.Logf("refused: %v", err)
				return
			}
			if err != nil {
				t.Fatalf("refused: %v", err)
			}
			var ids []string
			for _, e := range snap.entries {
				ids = append(ids, strings.TrimPrefix(e.ID.Path(), "/agent/"))
			}
			if !slices.Equal(ids, tc.ids) {
				t.Errorf("entries %v, want %v", ids, tc.ids)
			}
			if len(snap.agents) != len(tc.agents) {
				t.Errorf("agents at %d addresses, want %d", len(snap.agents), len(tc.agents))
			}
			for a, want := range tc.agents {
				var got []string
				for port, id := range snap.agents[netip.MustParseAddr(a)] {
					got = append(got, strconv.Itoa(int(port))+"="+strings.TrimPrefix(id.Path(), "/agent/"))
				}
				slices.Sort(got)
				if strings.Join(got, " ") != want {
					t.Errorf("agents at %s: %v, want %s", a, got, want)
				}
			}
		})
	}
}

// BenchmarkAgentsAt is the per-connection lookup of a remote host's agents, in a
// directory of 1000 hosts with 10 agents each.
func BenchmarkAgentsAt(b *testing.B) {
	doc := &DirectoryDocument{Version: 1}
	for h := range 1000 {
		host := spiffeid.RequireFromPathf(testTD, "/host/h%d", h)
		doc.Peers = append(doc.Peers, DirectoryEntry{SPIFFEID: host, TunnelPort: 15008,
			Addresses: []netip.Addr{netip.AddrFrom4([4]byte{10, 1, byte(h >> 8), byte(h)})}})
		for a := range 10 {
			doc.Entries = append(doc.Entries, Entry{ID: spiffeid.RequireFromPathf(testTD, "/agent/h%d-a%d", h, a),
				Host: host, UID: uint32(1000 + a), Port: uint16(8000 + a)})
		}
	}
	d, err := NewState(doc, spiffeid.ID{})
	if err != nil {
		b.Fatal(err)
	}
	addr := netip.AddrFrom4([4]byte{10, 1, 1, 244})
	if d.AgentsAt(addr)[8003].IsZero() {
		b.Fatal("agent missing")
	}
	b.ReportAllocs()
	for b.Loop() {
		_ = d.AgentsAt(addr)
	}
}
