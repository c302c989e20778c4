package node

import (
	"context"
	"encoding/pem"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/rotator"
)

const watchedPolicy = `inbound:
  - name: planner-to-search
    from: [spiffe://example.org/agent/planner]
    to: {ports: [8080]}
`

// watched is a configuration, its CA root file and its policy file on disk, with a
// watcher applying their changes to a fixture until the test ends.
type watched struct {
	*fixture
	dir string
	hup chan os.Signal
}

func startWatcher(t *testing.T) *watched {
	t.Helper()
	f := newFixture(t)
	w := &watched{fixture: f, dir: t.TempDir(), hup: make(chan os.Signal, 1)}
	w.writeRoots(f.ca)
	w.write("policy.yaml", watchedPolicy)
	w.write("proxy.yaml", watchedConfig("overlap: 10s"))
	cfg, err := LoadConfig(filepath.Join(w.dir, "proxy.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	wt := newWatcher(cfg, f.applier, slog.New(slog.DiscardHandler))
	wt.policyVersion = 1
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { wt.loop(ctx, w.hup) })
	t.Cleanup(func() { cancel(); wg.Wait() })
	return w
}

func watchedConfig(rotation string) string {
	return strings.Replace(goodConfig, "overlap: 10s", rotation, 1) + "policy: policy.yaml\n"
}

func (w *watched) write(name, content string) {
	if err := os.WriteFile(filepath.Join(w.dir, name), []byte(content), 0o600); err != nil {
		panic(err)
	}
}

func (w *watched) writeRoots(cas ...*testca.CA) {
	var b strings.Builder
	for _, ca := range cas {
		for _, c := range ca.Roots() {
			_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
		}
	}
	w.write("root.crt", b.String())
}

// next lets the watcher look at the files once more.
func next() {
	time.Sleep(configPoll) //nolint:forbidigo // synctest: advances the bubble's clock
	synctest.Wait()
}

// TestWatchPolicy: a changed policy file replaces the policy in force and is audited
// with its version; an invalid one is refused, audited, and the last good one stays.
func TestWatchPolicy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w := startWatcher(t)
		next()
		if n := w.px.policies(); n != 0 {
			t.Fatalf("%d policies applied with no file changed", n)
		}
		w.write("policy.yaml", strings.Replace(watchedPolicy, "8080", "9090", 1))
		next()
		recs := w.audit.policies()
		if w.px.policies() != 1 || len(recs) != 1 || recs[0].Result != "applied" || recs[0].Version != 2 {
			t.Fatalf("policies applied %d, records %+v; want version 2 applied", w.px.policies(), recs)
		}
		w.write("policy.yaml", "inbound: [unclosed\n")
		next()
		recs = w.audit.policies()
		if w.px.policies() != 1 || len(recs) != 2 || recs[1].Result != "refused" || recs[1].Version != 2 {
			t.Fatalf("policies applied %d, records %+v; want the invalid file refused, version 2 in force", w.px.policies(), recs)
		}
		// SIGHUP reads every file again, changed or not.
		w.hup <- syscall.SIGHUP
		synctest.Wait()
		if recs = w.audit.policies(); len(recs) != 3 || recs[2].Result != "refused" {
			t.Fatalf("records %+v, want SIGHUP to read the policy again", recs)
		}
	})
}

// TestWatchConfig: an invalid configuration file changes nothing; a valid change of
// the rotation policy applies it to every identity held, replaces the ticket keys and
// rotates them all (trigger config).
func TestWatchConfig(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w := startWatcher(t)
		w.register(registration{ID: planner, Host: testHost, UID: 1001})
		w.write("proxy.yaml", watchedConfig("overlap: -1s"))
		next()
		if got := w.px.resets(); len(got) != 0 {
			t.Fatalf("an invalid file was applied: ticket key resets %v", got)
		}
		if v := w.rot.Status().Current.Version; v != 1 {
			t.Fatalf("host at version %d after an invalid file, want 1", v)
		}
		w.write("proxy.yaml", watchedConfig("overlap: 20s"))
		next()
		if got := w.px.resets(); !slices.Equal(got, []string{"policy"}) {
			t.Fatalf("ticket key resets %v, want one for the policy change", got)
		}
		for _, h := range w.applier.held() {
			st := h.(*rotator.Rotator).Status()
			if st.Current == nil || st.Current.Version != 2 || string(st.Current.Cause) != string(rotator.TriggerConfig) {
				t.Fatalf("%s after the rotation policy changed: %+v, want version 2 by trigger config", h.ID(), st.Current)
			}
		}
		// The same policy again, with routes changed only: they apply live, and
		// nothing rotates.
		w.write("proxy.yaml", strings.Replace(watchedConfig("overlap: 20s"), "18080", "18081", 1))
		next()
		if got := w.px.resets(); len(got) != 1 {
			t.Fatalf("ticket key resets %v after a route change, want none more", got)
		}
	})
}

// TestWatchListeners: a changed route and a narrowed service allow list apply live,
// without a rotation, and are audited; an invalid file changes neither, is audited as
// refused with its file and line, and the last good configuration stays in force.
func TestWatchListeners(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w := startWatcher(t)
		good := strings.Replace(watchedConfig("overlap: 10s"), "127.0.0.1:18080", "127.0.0.1:18081", 1)
		good = strings.Replace(good, "allow: [spiffe://example.org/host/b]", "allow: [spiffe://example.org/host/c]", 1)
		w.write("proxy.yaml", good)
		next()
		routes, services := w.px.listeners()
		if len(routes) != 1 || len(routes[0]) != 1 || routes[0][0].Listen != "127.0.0.1:18081" {
			t.Fatalf("routes applied %+v, want one set with the route at 127.0.0.1:18081", routes)
		}
		if len(services) != 1 || len(services[0]) != 1 || services[0][0].Allow[0].String() != "spiffe://example.org/host/c" {
			t.Fatalf("services applied %+v, want one set allowing host/c", services)
		}
		if got := w.px.resets(); len(got) != 0 {
			t.Fatalf("ticket key resets %v after a listener change, want none", got)
		}
		// A route without a listen address: the whole file is refused.
		w.write("proxy.yaml", strings.Replace(good, "listen: 127.0.0.1:18081", "listen: \"\"", 1))
		next()
		if routes, services = w.px.listeners(); len(routes) != 1 || len(services) != 1 {
			t.Fatalf("an invalid file was applied: routes %+v, services %+v", routes, services)
		}
		recs := w.audit.configChanges()
		if len(recs) != 2 || recs[0].Result != audit.ConfigApplied || recs[1].Result != audit.ConfigRefused ||
			!strings.Contains(recs[1].Error, "proxy.yaml:") {
			t.Fatalf("config records %+v, want applied then refused naming the file", recs)
		}
	})
}

// TestWatchBundle: a root file with a new CA widens the bundle of the host and of every
// agent; one that drops a CA replaces every ticket key too; one that does not load is
// audited and changes nothing.
func TestWatchBundle(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		w := startWatcher(t)
		w.register(registration{ID: planner, Host: testHost, UID: 1001})
		other := testca.New(t)
		w.writeRoots(w.ca, other)
		next()
		if n := w.rot.Status().BundleLen; n != 2 || len(w.px.resets()) != 0 {
			t.Fatalf("bundle of %d authorities, resets %v; want 2 and none", n, w.px.resets())
		}
		held := w.applier.held()
		if len(held) != 2 {
			t.Fatalf("%d identities held, want the host's and the agent's", len(held))
		}
		for _, h := range held {
			if n := h.(*rotator.Rotator).Status().BundleLen; n != 2 {
				t.Fatalf("%s holds a bundle of %d authorities, want 2", h.ID(), n)
			}
		}
		w.write("root.crt", "not PEM")
		next()
		if n := w.rot.Status().BundleLen; n != 2 {
			t.Fatalf("bundle of %d authorities after a bad file, want 2 kept", n)
		}
		// A file without the anchor of the SVIDs held: that anchor stays in force.
		w.writeRoots(other)
		next()
		if b := w.applier.bundleInForce(); len(b.X509Authorities()) != 2 || !b.HasX509Authority(w.ca.Roots()[0]) || len(w.px.resets()) != 0 {
			t.Fatalf("bundle of %d authorities, resets %v; want 2 with the SVIDs' anchor and none", len(b.X509Authorities()), w.px.resets())
		}
	})
}
