package node

import (
	"errors"
	"fmt"
	"runtime/debug"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/rotator"
)

// statusOf is the status a heartbeat of f's node reports.
func (f *fixture) statusOf() *meshapi.ProxyStatus {
	return newProxyStatus("v1", f.applier.ready(), f.applier.identities())
}

// TestProxyStatusAfterRotation: a rotation kicks the heartbeat, whose status shows the
// new key active and the previous one in overlap since the rotation, the host first.
func TestProxyStatusAfterRotation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFixture(t)
		f.register(registration{ID: planner, Host: testHost, UID: 1001})
		old := *f.rot.Status().Current
		f.kicks.take()

		rotate, _ := f.applier.rotateOne(testHost)
		res, err := rotate(t.Context(), rotator.RotateRequest{Trigger: rotator.TriggerOperator, Actor: audit.Actor{Initiator: "uid:0"}, Reason: "test"})
		if err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if n := f.kicks.take(); n != 1 {
			t.Fatalf("%d heartbeats asked for after a rotation, want 1", n)
		}
		st := f.statusOf()
		if !st.Ready || st.NotReady != "" || st.Version != "v1" || len(st.Identities) != 2 ||
			st.Identities[0].SPIFFEID != testHost.String() || st.Identities[1].SPIFFEID != planner.String() {
			t.Fatalf("status = %+v, want ready with the host then planner", st)
		}
		host := st.Identities[0]
		if !host.Ready || host.RenewAt.IsZero() || len(host.Keys) != 2 {
			t.Fatalf("host = %+v, want ready with two keys", host)
		}
		want := []meshapi.KeyStatus{
			{Version: res.NewVersion, Serial: res.NewSerial, State: "active", Cause: "operator"},
			{Version: old.Version, Serial: old.Serial, State: "overlap", Cause: "operator", NotBefore: old.NotBefore, NotAfter: old.NotAfter},
		}
		for i, k := range host.Keys {
			w := want[i]
			if k.Version != w.Version || k.Serial != w.Serial || !meshapi.CanonicalSerial(k.Serial) || k.State != w.State || k.Cause != w.Cause ||
				!k.Since.Equal(time.Now()) || k.NotAfter.IsZero() || !k.NotBefore.Before(k.NotAfter) ||
				(!w.NotAfter.IsZero() && (!k.NotBefore.Equal(w.NotBefore) || !k.NotAfter.Equal(w.NotAfter))) {
				t.Errorf("key %d = %+v, want %+v since the rotation", i, k, w)
			}
		}
	})
}

// TestProxyStatusAfterRevocation: a deny-list that drops an SVID kicks the heartbeat,
// whose status shows the key compromised and the identity not ready; one that drops
// nothing does not.
func TestProxyStatusAfterRevocation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		f := newFixture(t)
		f.register(registration{ID: planner, Host: testHost, UID: 1001})
		f.kicks.take()

		f.applier.onDenyList(denyIdentity(search))
		synctest.Wait()
		if n := f.kicks.take(); n != 0 {
			t.Fatalf("%d heartbeats asked for after a deny-list dropping nothing, want 0", n)
		}
		f.applier.onDenyList(denyIdentity(planner))
		synctest.Wait()
		if n := f.kicks.take(); n != 1 {
			t.Fatalf("%d heartbeats asked for after a revocation, want 1", n)
		}
		st := f.statusOf()
		if st.Ready || !strings.Contains(st.NotReady, planner.String()) {
			t.Fatalf("status ready=%t (%q), want not ready for planner", st.Ready, st.NotReady)
		}
		agent := st.Identities[1]
		if agent.Ready || agent.Error == "" || len(agent.Keys) == 0 {
			t.Fatalf("planner = %+v, want not ready with its key listed", agent)
		}
		// Compromised, and destroyed at once with no connection to drain.
		if k := agent.Keys[0]; (k.State != "compromised" && k.State != "destroyed") || k.Cause != "revoked" || !k.Since.Equal(time.Now()) {
			t.Fatalf("planner's key = %+v, want compromised or destroyed (revoked) now", k)
		}
		if !st.Identities[0].Ready {
			t.Error("the host's identity is not ready")
		}
	})
}

// TestNewProxyStatusBounds: what a heartbeat reports stays within the bounds the CA
// keeps: the first meshapi.MaxProxyStatusIdentities identities, the first
// meshapi.MaxStatusKeys keys of each, texts cut to printable ASCII.
func TestNewProxyStatusBounds(t *testing.T) {
	t.Parallel()
	long := "a\nb" + strings.Repeat("é", meshapi.MaxStatusText)
	retired := make([]rotator.CredentialStatus, meshapi.MaxStatusKeys)
	for i := range retired {
		retired[i] = rotator.CredentialStatus{Version: uint64(len(retired) - i), State: audit.PhaseDestroyed}
	}
	ids := make([]rotator.Status, meshapi.MaxProxyStatusIdentities+44)
	for i := range ids {
		ids[i] = rotator.Status{SPIFFEID: fmt.Sprintf("spiffe://example.org/agent/%d", i), Error: long,
			Current: &rotator.CredentialStatus{Version: 99, State: audit.PhaseActive}, Retired: retired}
	}
	st := newProxyStatus(strings.Repeat("v", 100), errors.New(long), ids)
	if len(st.Identities) != meshapi.MaxProxyStatusIdentities || st.Identities[0].SPIFFEID != ids[0].SPIFFEID {
		t.Fatalf("%d identities starting with %s, want the first %d", len(st.Identities), st.Identities[0].SPIFFEID,
			meshapi.MaxProxyStatusIdentities)
	}
	if keys := st.Identities[0].Keys; len(keys) != meshapi.MaxStatusKeys || keys[0].Version != 99 || keys[1].Version != uint64(len(retired)) {
		t.Errorf("%d keys, the first %+v; want %d, the current one first", len(keys), keys[0], meshapi.MaxStatusKeys)
	}
	if len(st.Version) != meshapi.MaxStatusVersion {
		t.Errorf("version of %d bytes, want %d", len(st.Version), meshapi.MaxStatusVersion)
	}
	for _, s := range []string{st.NotReady, st.Identities[0].Error} {
		if len(s) != meshapi.MaxStatusText || !meshapi.Printable(s) || !strings.HasPrefix(s, "a; b??") {
			t.Errorf("text %q of %d bytes, want %d printable ASCII, its lines joined", s[:10], len(s), meshapi.MaxStatusText)
		}
	}
	if st.Ready {
		t.Error("status ready with an error")
	}
}

func TestBuildVersion(t *testing.T) {
	t.Parallel()
	rev := debug.BuildSetting{Key: "vcs.revision", Value: "0123456789abcdef0123"}
	modified := func(m string) debug.BuildSetting { return debug.BuildSetting{Key: "vcs.modified", Value: m} }
	for _, tc := range []struct {
		name string
		bi   *debug.BuildInfo
		ok   bool
		want string
	}{
		{name: "no build info", want: "unknown"},
		{name: "tagged", bi: &debug.BuildInfo{Main: debug.Module{Version: "v1.4.0"}}, ok: true, want: "v1.4.0"},
		{name: "checkout", ok: true, want: "(devel) 0123456789ab",
			bi: &debug.BuildInfo{Main: debug.Module{Version: "(devel)"},
				Settings: []debug.BuildSetting{{Key: "GOOS", Value: "linux"}, rev, modified("false")}}},
		{name: "dirty checkout", ok: true, want: "(devel) 0123456789ab+dirty",
			bi: &debug.BuildInfo{Settings: []debug.BuildSetting{rev, modified("true")}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := buildVersion(tc.bi, tc.ok); got != tc.want {
				t.Errorf("buildVersion = %q, want %q", got, tc.want)
			}
		})
	}
}
