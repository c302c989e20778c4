package ca

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/meshapi"
)

var (
	idA = spiffeid.RequireFromPath(testTD, "/host/a")
	idB = spiffeid.RequireFromPath(testTD, "/host/b")
)

func addrs(s ...string) []netip.Addr {
	out := make([]netip.Addr, len(s))
	for i, a := range s {
		out[i] = netip.MustParseAddr(a)
	}
	return out
}

func reg(id spiffeid.ID, port uint16, a ...string) registration {
	return registration{HostRegistration: meshapi.HostRegistration{ID: id, Addresses: addrs(a...), TunnelPort: port, Transports: []string{"tls"}}}
}

// dirStep is one operation on a dirState in a table test: a registration (reg set) or
// an expiry sweep (reg zero), at t0+at.
type dirStep struct {
	at       time.Duration
	reg      registration
	want     registerResult
	conflict bool          // the registration must be refused
	bump     bool          // the version must have increased
	removed  []spiffeid.ID // entries the step must have expired
}

func TestDirState(t *testing.T) {
	t.Parallel()
	const ttl = 30 * time.Second
	withBundle := reg(idA, 15008, "10.0.0.1")
	withBundle.BundleVersion = "v2"
	withH2 := reg(idA, 15008, "10.0.0.1")
	withH2.Transports = []string{"h2", "tls"}
	for _, tc := range []struct {
		name  string
		steps []dirStep
		final map[spiffeid.ID][]netip.Addr // live entries and their addresses at the end
	}{
		{
			name:  "new entry bumps the version",
			steps: []dirStep{{reg: reg(idA, 15008, "10.0.0.1"), want: regNew, bump: true}},
			final: map[spiffeid.ID][]netip.Addr{idA: addrs("10.0.0.1")},
		},
		{
			name: "plain heartbeat keeps the version",
			steps: []dirStep{
				{reg: reg(idA, 15008, "10.0.0.1"), want: regNew, bump: true},
				{at: 10 * time.Second, reg: reg(idA, 15008, "10.0.0.1"), want: regHeartbeat},
			},
			final: map[spiffeid.ID][]netip.Addr{idA: addrs("10.0.0.1")},
		},
		{
			name: "bundle version change keeps the version",
			steps: []dirStep{
				{reg: reg(idA, 15008, "10.0.0.1"), want: regNew, bump: true},
				{at: time.Second, reg: withBundle, want: regHeartbeat},
			},
			final: map[spiffeid.ID][]netip.Addr{idA: addrs("10.0.0.1")},
		},
		{
			name: "port change bumps the version",
			steps: []dirStep{
				{reg: reg(idA, 15008, "10.0.0.1"), want: regNew, bump: true},
				{at: time.Second, reg: reg(idA, 15009, "10.0.0.1"), want: regChanged, bump: true},
			},
			final: map[spiffeid.ID][]netip.Addr{idA: addrs("10.0.0.1")},
		},
		{
			name: "transport change bumps the version",
			steps: []dirStep{
				{reg: reg(idA, 15008, "10.0.0.1"), want: regNew, bump: true},
				{at: time.Second, reg: withH2, want: regChanged, bump: true},
			},
			final: map[spiffeid.ID][]netip.Addr{idA: addrs("10.0.0.1")},
		},
		{
			name: "address change bumps the version and frees the old address",
			steps: []dirStep{
				{reg: reg(idA, 15008, "10.0.0.1"), want: regNew, bump: true},
				{at: time.Second, reg: reg(idA, 15008, "10.0.0.9"), want: regChanged, bump: true},
				{at: 2 * time.Second, reg: reg(idB, 15008, "10.0.0.1"), want: regNew, bump: true},
			},
			final: map[spiffeid.ID][]netip.Addr{idA: addrs("10.0.0.9"), idB: addrs("10.0.0.1")},
		},
		{
			name: "address of a live entry is refused whole",
			steps: []dirStep{
				{reg: reg(idA, 15008, "10.0.0.1", "fd00::1"), want: regNew, bump: true},
				{at: time.Second, reg: reg(idB, 15008, "10.0.0.2", "fd00::1"), conflict: true},
			},
			final: map[spiffeid.ID][]netip.Addr{idA: addrs("10.0.0.1", "fd00::1")},
		},
		{
			name: "refused registration does not refresh the refused entry",
			steps: []dirStep{
				{reg: reg(idA, 15008, "10.0.0.1"), want: regNew, bump: true},
				{at: 20 * time.Second, reg: reg(idB, 15008, "10.0.0.2"), want: regNew, bump: true},
				{at: 25 * time.Second, reg: reg(idB, 15008, "10.0.0.1", "10.0.0.2"), conflict: true},
				{at: 51 * time.Second, bump: true, removed: []spiffeid.ID{idA, idB}},
			},
			final: map[spiffeid.ID][]netip.Addr{},
		},
		{
			name: "address of an expired entry can be claimed",
			steps: []dirStep{
				{reg: reg(idA, 15008, "10.0.0.1"), want: regNew, bump: true},
				{at: ttl, reg: reg(idB, 15008, "10.0.0.1"), want: regNew, bump: true, removed: []spiffeid.ID{idA}},
			},
			final: map[spiffeid.ID][]netip.Addr{idB: addrs("10.0.0.1")},
		},
		{
			name: "entry lives until exactly ttl after its last heartbeat",
			steps: []dirStep{
				{reg: reg(idA, 15008, "10.0.0.1"), want: regNew, bump: true},
				{at: ttl - time.Nanosecond},
				{at: ttl, bump: true, removed: []spiffeid.ID{idA}},
			},
			final: map[spiffeid.ID][]netip.Addr{},
		},
		{
			name: "heartbeats keep an entry alive past the ttl",
			steps: []dirStep{
				{reg: reg(idA, 15008, "10.0.0.1"), want: regNew, bump: true},
				{at: 20 * time.Second, reg: reg(idA, 15008, "10.0.0.1"), want: regHeartbeat},
				{at: 40 * time.Second, reg: reg(idA, 15008, "10.0.0.1"), want: regHeartbeat},
				{at: 69 * time.Second},
			},
			final: map[spiffeid.ID][]netip.Addr{idA: addrs("10.0.0.1")},
		},
		{
			name: "only the stale entry expires",
			steps: []dirStep{
				{reg: reg(idA, 15008, "10.0.0.1"), want: regNew, bump: true},
				{at: 10 * time.Second, reg: reg(idB, 15008, "10.0.0.2"), want: regNew, bump: true},
				{at: 35 * time.Second, bump: true, removed: []spiffeid.ID{idA}},
				{at: 39 * time.Second},
				{at: 40 * time.Second, bump: true, removed: []spiffeid.ID{idB}},
			},
			final: map[spiffeid.ID][]netip.Addr{},
		},
		{
			name:  "expiry of an empty registry changes nothing",
			steps: []dirStep{{at: time.Hour}},
			final: map[spiffeid.ID][]netip.Addr{},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
			s := newDirState(1000, ttl)
			for i, st := range tc.steps {
				before := s.version
				var removed []dirEntry
				if st.reg.ID.IsZero() {
					removed = s.expire(t0.Add(st.at))
				} else {
					res, rm, err := s.register(st.reg, t0.Add(st.at))
					removed = rm
					var ce *conflictError
					if st.conflict != errors.As(err, &ce) {
						t.Fatalf("step %d: err = %v, conflict wanted: %v", i, err, st.conflict)
					}
					if err == nil && res != st.want {
						t.Errorf("step %d: result %d, want %d", i, res, st.want)
					}
				}
				if bumped := s.version > before; bumped != st.bump {
					t.Errorf("step %d: version %d -> %d, bump wanted: %v", i, before, s.version, st.bump)
				}
				if s.version < before {
					t.Fatalf("step %d: version went back from %d to %d", i, before, s.version)
				}
				var ids []spiffeid.ID
				for _, e := range removed {
					ids = append(ids, e.ID)
				}
				if !slices.Equal(ids, st.removed) {
					t.Errorf("step %d: expired %v, want %v", i, ids, st.removed)
				}
			}
			doc := s.snapshot()
			got := make(map[spiffeid.ID][]netip.Addr)
			for _, p := range doc.Peers {
				got[p.SPIFFEID] = p.Addresses
			}
			if len(got) != len(tc.final) {
				t.Fatalf("final entries %v, want %v", got, tc.final)
			}
			for id, want := range tc.final {
				if !slices.Equal(got[id], want) {
					t.Errorf("%v: addresses %v, want %v", id, got[id], want)
				}
			}
			// The address index matches the entries.
			owners := 0
			for _, e := range s.entries {
				for _, a := range e.Addresses {
					owners++
					if s.owners[a] != e.ID {
						t.Errorf("owner of %v is %v, want %v", a, s.owners[a], e.ID)
					}
				}
			}
			if owners != len(s.owners) {
				t.Errorf("%d addresses indexed, %d held", len(s.owners), owners)
			}
		})
	}
}

func TestDirStateSnapshot(t *testing.T) {
	t.Parallel()
	t0 := time.Now()
	s := newDirState(0, time.Minute)
	if s.version == 0 {
		t.Fatal("version 0 is reserved for \"none held\"")
	}
	for _, r := range []registration{reg(idB, 2, "10.0.0.2"), reg(idA, 1, "10.0.0.1", "fd00::1")} {
		if _, _, err := s.register(r, t0); err != nil {
			t.Fatal(err)
		}
	}
	doc := s.snapshot()
	if len(doc.Peers) != 2 || doc.Peers[0].SPIFFEID != idA || doc.Peers[1].SPIFFEID != idB {
		t.Fatalf("peers not sorted by ID: %+v", doc.Peers)
	}
	if !doc.Peers[0].LastHeartbeat.Equal(t0) || doc.Version != s.version {
		t.Errorf("snapshot = %+v", doc)
	}
	// The snapshot shares nothing with the state.
	doc.Peers[0].Addresses[0] = netip.MustParseAddr("192.0.2.1")
	doc.Peers[0].Transports[0] = "x"
	again := s.snapshot()
	if again.Peers[0].Addresses[0] != netip.MustParseAddr("10.0.0.1") || again.Peers[0].Transports[0] != "tls" {
		t.Error("mutating a snapshot changed the registry")
	}
	b, err := json.Marshal(again)
	if err != nil {
		t.Fatal(err)
	}
	back, err := meshapi.DecodeState(b, idB)
	if err != nil {
		t.Fatalf("the client cannot read the server's document: %v\n%s", err, b)
	}
	if back.Version() != s.version || back.Peers() != 2 {
		t.Errorf("round trip: %+v", back)
	}
}

// A deny-list in force removes the entries it denies (by ID, or by the serial they
// registered with), frees their addresses, moves the version, rides along in the
// snapshot, and refuses their registration.
func TestDirStateRevocations(t *testing.T) {
	t.Parallel()
	t0 := time.Now()
	s := newDirState(1000, time.Minute)
	regA, regB := reg(idA, 1, "10.0.0.1"), reg(idB, 2, "10.0.0.2")
	regA.Serial, regB.Serial = "11", "22"
	for _, r := range []registration{regA, regB} {
		if _, _, err := s.register(r, t0); err != nil {
			t.Fatal(err)
		}
	}
	list := func(version uint64, ids []spiffeid.ID, serials ...string) (*meshapi.SignedDenyList, *meshapi.DenyList) {
		l := &meshapi.DenyList{TrustDomain: testTD.Name(), Version: version, IssuedAt: t0}
		for _, id := range ids {
			l.IDs = append(l.IDs, meshapi.DeniedID{SPIFFEID: id, RevokedAt: t0, Version: version})
		}
		for _, sn := range serials {
			l.Serials = append(l.Serials, meshapi.DeniedSerial{Serial: sn, RevokedAt: t0, Version: version})
		}
		return &meshapi.SignedDenyList{Payload: []byte{byte(version)}}, l
	}
	idC := spiffeid.RequireFromPath(testTD, "/host/c")

	for _, step := range []struct {
		name    string
		ids     []spiffeid.ID
		serials []string
		removed []spiffeid.ID
		refused []registration // refused once the list is in force
		allowed []registration // admitted once the list is in force
	}{
		{name: "nothing denied yet: version moves, nothing removed"},
		{name: "identity denied", ids: []spiffeid.ID{idA}, removed: []spiffeid.ID{idA},
			refused: []registration{regA, func() registration { r := regA; r.Serial = "99"; return r }()},
			allowed: []registration{reg(idC, 3, "10.0.0.1")}}, // A's address is free again
		{name: "serial denied", ids: []spiffeid.ID{idA}, serials: []string{"22"}, removed: []spiffeid.ID{idB},
			refused: []registration{regB},
			allowed: []registration{func() registration { r := regB; r.Serial = "23"; return r }()}},
	} {
		before := s.version
		signed, l := list(before, step.ids, step.serials...)
		removed := s.setRevocations(signed, l)
		var got []spiffeid.ID
		for _, e := range removed {
			got = append(got, e.ID)
		}
		if !slices.Equal(got, step.removed) || s.version != before+1 {
			t.Errorf("%s: removed %v (want %v), version %d -> %d", step.name, got, step.removed, before, s.version)
		}
		if doc := s.snapshot(); doc.Revocations != signed || doc.Version != s.version {
			t.Errorf("%s: snapshot carries %v at version %d", step.name, doc.Revocations, doc.Version)
		}
		for _, r := range step.refused {
			if _, _, err := s.register(r, t0); !errors.Is(err, ErrRevoked) {
				t.Errorf("%s: register %s serial %s = %v, want ErrRevoked", step.name, r.ID, r.Serial, err)
			}
		}
		for _, r := range step.allowed {
			if _, _, err := s.register(r, t0); err != nil {
				t.Errorf("%s: register %s serial %s = %v", step.name, r.ID, r.Serial, err)
			}
		}
	}
}

// The registry's loops, under synctest: a long-poll returns at once on a newer
// version, parks until a registration or the janitor's expiry wakes it, answers with
// the same version when its wait runs out, and answers at once after close.
func TestRegistryWatch(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		const ttl = 30 * time.Second
		r := newRegistry(ttl, slog.New(slog.DiscardHandler), time.Now())
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		janitorDone := make(chan struct{})
		go func() { r.run(ctx); close(janitorDone) }()

		v0 := r.snapshot(time.Now()).Version
		watch := func(since uint64, wait time.Duration) chan meshapi.DirectoryDocument {
			ch := make(chan meshapi.DirectoryDocument, 1)
			go func() {
				b, err := r.watch(ctx, spiffeid.ID{}, since, wait)
				if err != nil {
					t.Errorf("watch: %v", err)
				}
				var doc meshapi.DirectoryDocument
				if err := json.Unmarshal(b, &doc); err != nil {
					t.Errorf("watch answer: %v", err)
				}
				ch <- doc
			}()
			return ch
		}

		// Another version than "since": at once.
		if doc := <-watch(v0-1, time.Minute); doc.Version != v0 {
			t.Fatalf("watch(since older) = %d, want %d", doc.Version, v0)
		}

		// Same version: parked until a registration.
		w := watch(v0, time.Minute)
		synctest.Wait()
		select {
		case doc := <-w:
			t.Fatalf("watch returned without a change: %+v", doc)
		default:
		}
		start := time.Now()
		if _, _, err := r.register(reg(idA, 15008, "10.0.0.1"), time.Now()); err != nil {
			t.Fatal(err)
		}
		doc := <-w
		if doc.Version <= v0 || len(doc.Peers) != 1 || time.Since(start) != 0 {
			t.Fatalf("woken watch: %+v after %v", doc, time.Since(start))
		}
		v1 := doc.Version

		// A plain heartbeat does not wake it; the wait running out does, same version.
		w = watch(v1, 20*time.Second)
		synctest.Wait()
		if _, _, err := r.register(reg(idA, 15008, "10.0.0.1"), time.Now()); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		select {
		case doc := <-w:
			t.Fatalf("a heartbeat woke the watch: %+v", doc)
		default:
		}
		start = time.Now()
		if doc := <-w; doc.Version != v1 || time.Since(start) != 20*time.Second {
			t.Fatalf("timed-out watch: version %d after %v, want %d after 20s", doc.Version, time.Since(start), v1)
		}

		// The janitor drops the entry at its TTL and wakes the watcher: the last
		// heartbeat was 20s ago, so 10s from now.
		w = watch(v1, time.Minute)
		start = time.Now()
		doc = <-w
		if doc.Version <= v1 || len(doc.Peers) != 0 || time.Since(start) != 10*time.Second {
			t.Fatalf("after expiry: %+v after %v, want no peers after 10s", doc, time.Since(start))
		}

		// Close answers everyone at once.
		w = watch(doc.Version, time.Minute)
		synctest.Wait()
		r.close()
		<-w
		if doc := <-watch(doc.Version, time.Minute); doc.Version == 0 {
			t.Fatal("watch after close")
		}
		// Registrations after close (requests in flight during shutdown) still work.
		if _, _, err := r.register(reg(idB, 1, "10.0.0.2"), time.Now()); err != nil {
			t.Fatal(err)
		}
		<-janitorDone
	})
}

// A watcher whose request ends gets ctx's error, not an answer to write.
func TestRegistryWatchCancel(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		r := newRegistry(time.Minute, slog.New(slog.DiscardHandler), time.Now())
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() {
			_, err := r.watch(ctx, spiffeid.ID{}, r.snapshot(time.Now()).Version, time.Minute)
			done <- err
		}()
		synctest.Wait()
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("watch after cancel: %v", err)
		}
	})
}
