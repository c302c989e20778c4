package node

import (
	"errors"
	"fmt"
	"runtime/debug"
	"strings"
	"testing"
	"testing/synctest"
	"time"
	"unicode/utf8"

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
			if k.Version != w.Version || k.Serial != w.Serial || k.State != w.State || k.Cause != w.Cause ||
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

// TestNewProxyStatusBounds: at most meshapi.MaxProxyStatusIdentities identities, the
// first ones, and free text clipped to whole characters.
func TestNewProxyStatusBounds(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("é", maxStatusText) // two bytes each: clipped in the middle of none
	ids := make([]rotator.Status, meshapi.MaxProxyStatusIdentities+44)
	for i := range ids {
		ids[i] = rotator.Status{SPIFFEID: fmt.Sprintf("spiffe://example.org/agent/%d", i), Error: long}
	}
	st := newProxyStatus("v1", errors.New(long), ids)
	if len(st.Identities) != meshapi.MaxProxyStatusIdentities || st.Identities[0].SPIFFEID != ids[0].SPIFFEID {
		t.Fatalf("%d identities starting with %s, want the first %d", len(st.Identities), st.Identities[0].SPIFFEID,
			meshapi.MaxProxyStatusIdentities)
	}
	for _, s := range []string{st.NotReady, st.Identities[0].Error} {
		if len(s) > maxStatusText || len(s) < maxStatusText-1 || !utf8.ValidString(s) {
			t.Errorf("text of %d bytes (valid UTF-8: %t), want clipped to %d", len(s), utf8.ValidString(s), maxStatusText)
		}
	}
	if st.Ready || st.Identities[0].Keys == nil {
		t.Errorf("status = ready %t, keys %v; want not ready and an empty key list", st.Ready, st.Identities[0].Keys)
	}
}

func TestBuildVersion(t *testing.T) {
	t.Parallel()
	settings := func(kv ...string) []debug.BuildSetting {
		var out []debug.BuildSetting
		for i := 0; i < len(kv); i += 2 {
			out = append(out, debug.BuildSetting{Key: kv[i], Value: kv[i+1]})
		}
		return out
	}
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
				Settings: settings("GOOS", "linux", "vcs.revision", "0123456789abcdef0123", "vcs.modified", "false")}},
		{name: "dirty checkout", ok: true, want: "(devel) 0123456789ab+dirty",
			bi: &debug.BuildInfo{Settings: settings("vcs.revision", "0123456789abcdef0123", "vcs.modified", "true")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := buildVersion(tc.bi, tc.ok); got != tc.want {
				t.Errorf("buildVersion = %q, want %q", got, tc.want)
			}
		})
	}
}
