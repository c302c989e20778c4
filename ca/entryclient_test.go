package ca

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"github.com/agentmesh/agentmesh/meshapi"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// entriesWatcher runs a Directory for a proxy holding svid that advertises a, and
// reports each OnEntries call.
func entriesWatcher(t *testing.T, ca *runningCA, svid *x509svid.SVID, a ...string) (*Directory, chan []meshapi.Entry) {
	t.Helper()
	logger, _ := newTestLogger(t)
	cert := tlsCert(svid)
	got := make(chan []meshapi.Entry, 16)
	d, err := NewDirectory(DirectoryConfig{
		URL:         ca.URL(),
		Roots:       ca.Roots(),
		Certificate: func() (*tls.Certificate, error) { return cert, nil },
		Addresses:   addrs(a...),
		TunnelPort:  15008,
		OnEntries:   func(e []meshapi.Entry) { got <- e },
		Logger:      logger.With("proxy", svid.ID.String()),
	})
	if err != nil {
		t.Fatal(err)
	}
	runDirectory(t, d)
	return d, got
}

// nextEntries waits for one OnEntries call; the guard is well under the 25s long-poll,
// so a pass means the poll was woken.
func nextEntries(t *testing.T, ch <-chan []meshapi.Entry) []meshapi.Entry {
	t.Helper()
	select {
	case e := <-ch:
		return e
	case <-time.After(10 * time.Second):
		t.Fatal("OnEntries not called within 10s")
		return nil
	}
}

// The directory carries the entries to every proxy at once, each proxy seeing its own
// host's entries whole and of the others only the agents with a port, without their
// uid: Entries, AgentsAt by the addresses of the agents' host (the proxy's own
// included), and OnEntries on the first directory and on each change of the entries,
// not on other changes.
func TestDirectoryEntries(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	ctx := context.Background()
	dA, _ := entriesWatcher(t, ca, enroll(t, ca, idA), "10.0.9.1", "fd00::9:1")
	dB, gotB := entriesWatcher(t, ca, enroll(t, ca, idB), "10.0.9.2")
	if first := nextEntries(t, gotB); len(first) != 0 {
		t.Fatalf("first OnEntries %+v, want none", first)
	}
	waitUntil(t, dB, "host a in the directory", func() bool { _, _, ok := dB.PeerFor(netip.MustParseAddr("10.0.9.1")); return ok })

	x := meshapi.Entry{ID: agentX, Host: idA, UID: 1000, Port: 8080}
	y := meshapi.Entry{ID: agentY, Host: idA, UID: 1001} // no port: not in AgentsAt
	z := meshapi.Entry{ID: agentZ, Host: idB, UID: 1000, Port: 9090}
	for _, e := range []meshapi.Entry{x, y, z} {
		if err := RegisterEntry(ctx, cfg.StateDir, e); err != nil {
			t.Fatal(err)
		}
	}
	// Host b's view: a's agent with a port by ID and port only; a's agent without a
	// port not at all.
	xSeen := meshapi.Entry{ID: agentX, Host: idA, Port: 8080}
	want := []meshapi.Entry{xSeen, z}
	for got := nextEntries(t, gotB); !slices.Equal(got, want); got = nextEntries(t, gotB) {
		t.Logf("OnEntries %+v on the way", got)
	}
	if got := dB.Entries(); !slices.Equal(got, want) {
		t.Errorf("Entries = %+v", got)
	}
	for _, tc := range []struct {
		addr string
		want map[uint16]spiffeid.ID
	}{
		{"10.0.9.1", map[uint16]spiffeid.ID{8080: agentX}},
		{"fd00::9:1", map[uint16]spiffeid.ID{8080: agentX}},
		{"::ffff:10.0.9.1", map[uint16]spiffeid.ID{8080: agentX}},
		{"10.0.9.2", map[uint16]spiffeid.ID{9090: agentZ}}, // the watcher's own host
		{"10.0.9.3", nil},
	} {
		got := dB.AgentsAt(netip.MustParseAddr(tc.addr))
		if len(got) != len(tc.want) || (tc.want == nil) != (got == nil) {
			t.Errorf("AgentsAt(%s) = %v, want %v", tc.addr, got, tc.want)
		}
		for port, id := range tc.want {
			if got[port] != id {
				t.Errorf("AgentsAt(%s)[%d] = %v, want %v", tc.addr, port, got[port], id)
			}
		}
	}
	zSeen := meshapi.Entry{ID: agentZ, Host: idB, Port: 9090}
	waitUntil(t, dA, "entries at host a's proxy", func() bool { return slices.Equal(dA.Entries(), []meshapi.Entry{x, y, zSeen}) })
	addr := netip.MustParseAddr("10.0.9.1")
	if n := testing.AllocsPerRun(100, func() { _ = dA.AgentsAt(addr) }); n != 0 {
		t.Errorf("AgentsAt allocates %v times", n)
	}

	// A change that is not to the entries moves the version without an OnEntries
	// call: the next call is the next change of the entries.
	if _, err := ca.Revoke(ctx, "op", meshapi.RevokeRequest{SPIFFEID: "spiffe://mesh.test/host/gone", Reason: "r"}); err != nil {
		t.Fatal(err)
	}
	revoked, err := RequestDirectory(ctx, cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, dB, "directory after the revocation", func() bool { return dB.Version() >= revoked.Version })
	if err := UnregisterEntry(ctx, cfg.StateDir, agentX); err != nil {
		t.Fatal(err)
	}
	if got := nextEntries(t, gotB); !slices.Equal(got, []meshapi.Entry{z}) {
		t.Errorf("OnEntries after unregister %+v, want z only", got)
	}
	if got := dB.AgentsAt(addr); got != nil {
		t.Errorf("AgentsAt(%v) after unregister = %v, want nil", addr, got)
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
			snap, err := decodeDirectory([]byte(`{"version":2,`+peers+`,"entries":`+tc.entries+`}`), self)
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
				ids = append(ids, strings.TrimPrefix(e.ID.Path(), agentPathPrefix))
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
					got = append(got, strconv.Itoa(int(port))+"="+strings.TrimPrefix(id.Path(), agentPathPrefix))
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
	d, err := NewDirectory(DirectoryConfig{URL: "https://ca.mesh.test:9443", Roots: []*x509.Certificate{{}},
		Certificate: func() (*tls.Certificate, error) { return nil, errors.New("none") }})
	if err != nil {
		b.Fatal(err)
	}
	doc := &meshapi.DirectoryDocument{Version: 1}
	for h := range 1000 {
		host := spiffeid.RequireFromPathf(testTD, "/host/h%d", h)
		doc.Peers = append(doc.Peers, meshapi.DirectoryEntry{SPIFFEID: host, TunnelPort: 15008,
			Addresses: []netip.Addr{netip.AddrFrom4([4]byte{10, 1, byte(h >> 8), byte(h)})}})
		for a := range 10 {
			doc.Entries = append(doc.Entries, meshapi.Entry{ID: spiffeid.RequireFromPathf(testTD, "/agent/h%d-a%d", h, a),
				Host: host, UID: uint32(1000 + a), Port: uint16(8000 + a)})
		}
	}
	snap, err := directoryRoutes(doc, spiffeid.ID{})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := d.apply(snap); err != nil {
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
