package ca

import (
	"context"
	"crypto/tls"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"
)

// entriesWatcher runs a Member for a proxy holding svid that advertises a, and
// follows its registration entries.
func entriesWatcher(t *testing.T, ca *runningCA, svid *x509svid.SVID, a ...string) (*meshclient.Member, *stateFollower) {
	t.Helper()
	logger, _ := newTestLogger(t)
	cert := tlsCert(svid)
	d, err := meshclient.NewMember(meshclient.Config{
		URL:         ca.URL(),
		Roots:       ca.Roots(),
		Certificate: func() (*tls.Certificate, error) { return cert, nil },
		Addresses:   addrs(a...),
		TunnelPort:  15008,
		Logger:      logger.With("proxy", svid.ID.String()),
	})
	if err != nil {
		t.Fatal(err)
	}
	runDirectory(t, d)
	return d, newStateFollower(d.Watch, time.Now())
}

// nextEntries waits for the next state whose entries a proxy applies.
func nextEntries(t *testing.T, f *stateFollower) []meshapi.Entry {
	t.Helper()
	return f.entries(t)
}

// The directory carries the entries to every proxy at once, each proxy seeing its own
// host's entries whole and of the others only the agents with a port, without their
// uid: Entries, AgentsAt by the addresses of the agents' host (the proxy's own
// included), and entries to apply in the first directory and on each change of the
// entries, not on other changes.
func TestDirectoryEntries(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	ctx := context.Background()
	dA, _ := entriesWatcher(t, ca, enroll(t, ca, idA), "10.0.9.1", "fd00::9:1")
	dB, gotB := entriesWatcher(t, ca, enroll(t, ca, idB), "10.0.9.2")
	if first := nextEntries(t, gotB); len(first) != 0 {
		t.Fatalf("first entries %+v, want none", first)
	}
	waitUntil(t, dB, "host a in the directory", func() bool { _, _, ok := dB.Watch.State().PeerFor(netip.MustParseAddr("10.0.9.1")); return ok })

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
		t.Logf("entries %+v on the way", got)
	}
	if got := dB.Watch.State().Entries(); !slices.Equal(got, want) {
		t.Errorf("Entries = %+v", got)
	}
	// Agents by address need their host's entry too, and b's own registration may reach
	// the directory after the entries did.
	waitUntil(t, dB, "host b's own entry in the directory", func() bool {
		return dB.Watch.State().AgentsAt(netip.MustParseAddr("10.0.9.2")) != nil
	})
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
		got := dB.Watch.State().AgentsAt(netip.MustParseAddr(tc.addr))
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
	waitUntil(t, dA, "entries at host a's proxy", func() bool { return slices.Equal(dA.Watch.State().Entries(), []meshapi.Entry{x, y, zSeen}) })
	addr := netip.MustParseAddr("10.0.9.1")
	if n := testing.AllocsPerRun(100, func() { _ = dA.Watch.State().AgentsAt(addr) }); n != 0 {
		t.Errorf("AgentsAt allocates %v times", n)
	}

	// A change that is not to the entries moves the version without entries to
	// apply: the next are those of the next change of the entries.
	if _, err := ca.Revoke(ctx, audit.Actor{Initiator: "op"}, meshapi.RevokeRequest{SPIFFEID: "spiffe://mesh.test/host/gone", Reason: "r"}); err != nil {
		t.Fatal(err)
	}
	revoked, err := RequestDirectory(ctx, cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, dB, "directory after the revocation", func() bool { return dB.Watch.State().Version() >= revoked.Version })
	if err := UnregisterEntry(ctx, cfg.StateDir, agentX); err != nil {
		t.Fatal(err)
	}
	if got := nextEntries(t, gotB); !slices.Equal(got, []meshapi.Entry{z}) {
		t.Errorf("entries after unregister %+v, want z only", got)
	}
	if got := dB.Watch.State().AgentsAt(addr); got != nil {
		t.Errorf("AgentsAt(%v) after unregister = %v, want nil", addr, got)
	}
}
