package ca

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

var (
	agentX = spiffeid.RequireFromPath(testTD, "/agent/x")
	agentY = spiffeid.RequireFromPath(testTD, "/agent/y")
	agentZ = spiffeid.RequireFromPath(testTD, "/agent/z")
)

func TestCheckRegistration(t *testing.T) {
	t.Parallel()
	other := spiffeid.RequireTrustDomainFromString("other.test")
	ok := meshapi.Entry{ID: agentX, Host: idA, UID: 1000, Port: 8080}
	for _, tc := range []struct {
		name   string
		mutate func(*meshapi.Entry)
		valid  bool
	}{
		{"valid", func(*meshapi.Entry) {}, true},
		{"uid 0 and no port", func(e *meshapi.Entry) { e.UID, e.Port = 0, 0 }, true},
		{"no id", func(e *meshapi.Entry) { e.ID = spiffeid.ID{} }, false},
		{"no host", func(e *meshapi.Entry) { e.Host = spiffeid.ID{} }, false},
		{"id in another trust domain", func(e *meshapi.Entry) { e.ID = spiffeid.RequireFromPath(other, "/agent/x") }, false},
		{"host in another trust domain", func(e *meshapi.Entry) { e.Host = spiffeid.RequireFromPath(other, "/host/a") }, false},
		{"id not an agent", func(e *meshapi.Entry) { e.ID = spiffeid.RequireFromPath(testTD, "/workload/x") }, false},
		{"id is the agent prefix", func(e *meshapi.Entry) { e.ID = spiffeid.RequireFromPath(testTD, "/agent") }, false},
		{"id with two segments", func(e *meshapi.Entry) { e.ID = spiffeid.RequireFromPath(testTD, "/agent/x/y") }, false},
		{"id is the trust domain", func(e *meshapi.Entry) { e.ID = testTD.ID() }, false},
		{"host not a host", func(e *meshapi.Entry) { e.Host = spiffeid.RequireFromPath(testTD, "/agent/a") }, false},
		{"host with two segments", func(e *meshapi.Entry) { e.Host = spiffeid.RequireFromPath(testTD, "/host/eu/a") }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := ok
			tc.mutate(&e)
			err := checkRegistration(testTD, e)
			if tc.valid != (err == nil) {
				t.Fatalf("checkRegistration(%+v) = %v, valid wanted: %v", e, err, tc.valid)
			}
			if err != nil && !errors.Is(err, ErrInvalidRequest) {
				t.Errorf("error %v does not wrap ErrInvalidRequest", err)
			}
		})
	}
}

func TestEntrySet(t *testing.T) {
	t.Parallel()
	x := meshapi.Entry{ID: agentX, Host: idA, UID: 1000, Port: 8080}
	for _, tc := range []struct {
		name     string
		existing []meshapi.Entry
		add      meshapi.Entry
		conflict bool
	}{
		{"first", nil, x, false},
		{"same id, same host", []meshapi.Entry{x}, x, true},
		{"same id, other host", []meshapi.Entry{x}, meshapi.Entry{ID: agentX, Host: idB, UID: 1}, true},
		{"same uid on the host", []meshapi.Entry{x}, meshapi.Entry{ID: agentY, Host: idA, UID: 1000}, true},
		{"same port on the host", []meshapi.Entry{x}, meshapi.Entry{ID: agentY, Host: idA, UID: 1001, Port: 8080}, true},
		{"same uid on another host", []meshapi.Entry{x}, meshapi.Entry{ID: agentY, Host: idB, UID: 1000, Port: 8080}, false},
		{"other uid and port", []meshapi.Entry{x}, meshapi.Entry{ID: agentY, Host: idA, UID: 1001, Port: 8081}, false},
		{"no port twice", []meshapi.Entry{{ID: agentX, Host: idA, UID: 1}}, meshapi.Entry{ID: agentY, Host: idA, UID: 2}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			set, err := newEntrySet(tc.existing)
			if err != nil {
				t.Fatal(err)
			}
			next, err := set.with(tc.add)
			if tc.conflict {
				if !errors.Is(err, ErrEntryConflict) {
					t.Fatalf("with(%+v) = %v, want a conflict", tc.add, err)
				}
				t.Logf("refused: %v", err)
				return
			}
			if err != nil {
				t.Fatalf("with(%+v): %v", tc.add, err)
			}
			if got, ok := next.byID[tc.add.ID]; !ok || got != tc.add || len(next.sorted) != len(tc.existing)+1 {
				t.Errorf("set after with: %+v", next.sorted)
			}
			if len(set.sorted) != len(tc.existing) {
				t.Error("with changed the original set")
			}
		})
	}

	t.Run("without frees the id, uid and port", func(t *testing.T) {
		t.Parallel()
		set, err := newEntrySet([]meshapi.Entry{{ID: agentY, Host: idA, UID: 2}, x, {ID: agentZ, Host: idB, UID: 1000, Port: 8080}})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.IsSortedFunc(set.sorted, meshapi.CompareEntries) {
			t.Errorf("not sorted: %+v", set.sorted)
		}
		next, old, err := set.without(agentX)
		if err != nil || old != x {
			t.Fatalf("without = %+v, %v", old, err)
		}
		if _, err := next.with(meshapi.Entry{ID: agentX, Host: idB, UID: 7}); err != nil {
			t.Errorf("re-register on another host: %v", err)
		}
		if _, err := next.with(meshapi.Entry{ID: spiffeid.RequireFromPath(testTD, "/agent/w"), Host: idA, UID: 1000, Port: 8080}); err != nil {
			t.Errorf("uid and port freed: %v", err)
		}
		if _, _, err := next.without(agentX); !errors.Is(err, ErrEntryNotFound) {
			t.Errorf("second without = %v, want ErrEntryNotFound", err)
		}
	})
}

func registrations(r *auditRecorder) []audit.Registration {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []audit.Registration
	for _, e := range r.events {
		if reg, ok := e.(audit.Registration); ok {
			out = append(out, reg)
		}
	}
	return out
}

func responseStatus(err error) int {
	var re *meshapi.ResponseError
	if errors.As(err, &re) {
		return re.Status
	}
	return 0
}

// Entries live in StateDir/entries.json (0600) and come back after a restart, in the
// directory too; a corrupt file stops New with an error naming it.
func TestEntriesSurviveRestart(t *testing.T) {
	cfg, _ := testConfig(t)
	ctx := context.Background()
	first := startCA(t, cfg)
	x := meshapi.Entry{ID: agentX, Host: idA, UID: 1000, Port: 8080}
	y := meshapi.Entry{ID: agentY, Host: idB, UID: 0}
	for _, e := range []meshapi.Entry{x, y} {
		if err := first.RegisterEntry(ctx, audit.Actor{Initiator: "op"}, e); err != nil {
			t.Fatal(err)
		}
	}
	if err := first.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}
	path := filepath.Join(cfg.StateDir, fileEntries)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("%s mode %v, want 0600", path, fi.Mode().Perm())
	}

	second := startCA(t, cfg)
	if got := second.Entries(); !slices.Equal(got, []meshapi.Entry{x, y}) {
		t.Fatalf("entries after restart %+v", got)
	}
	doc, err := RequestDirectory(ctx, cfg.StateDir)
	if err != nil || !slices.Equal(doc.Entries, []meshapi.Entry{x, y}) {
		t.Fatalf("directory after restart: %+v, %v", doc, err)
	}
	if err := RegisterEntry(ctx, cfg.StateDir, meshapi.Entry{ID: agentX, Host: idB, UID: 5}); responseStatus(err) != http.StatusConflict {
		t.Errorf("conflict with a loaded entry: %v, want 409", err)
	}
	if err := second.stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}

	requireCorruptRefused(t, cfg, path, map[string]string{
		"not json":         `{"entries":[`,
		"unknown field":    `{"entries":[],"extra":1}`,
		"invalid entry":    `{"entries":[{"id":"spiffe://mesh.test/host/x","host":"spiffe://mesh.test/host/a","uid":1}]}`,
		"conflict":         `{"entries":[{"id":"spiffe://mesh.test/agent/x","host":"spiffe://mesh.test/host/a","uid":1},{"id":"spiffe://mesh.test/agent/y","host":"spiffe://mesh.test/host/a","uid":1}]}`,
		"bad spiffe id":    `{"entries":[{"id":"https://mesh.test/agent/x","host":"spiffe://mesh.test/host/a","uid":1}]}`,
		"port out of band": `{"entries":[{"id":"spiffe://mesh.test/agent/x","host":"spiffe://mesh.test/host/a","uid":1,"port":70000}]}`,
	})
}
