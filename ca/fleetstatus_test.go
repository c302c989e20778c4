package ca

import (
	"encoding/json"
	"errors"
	"io"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

var (
	statusHost  = spiffeid.RequireFromPath(testTD, "/host/a")
	statusAgent = "spiffe://mesh.test/agent/x"
)

func agentReport(keys ...meshapi.KeyStatus) *meshapi.ProxyStatus {
	return &meshapi.ProxyStatus{Version: "v1", Ready: true,
		Identities: []meshapi.IdentityStatus{{SPIFFEID: statusAgent, Ready: true, Keys: keys}}}
}

func key(v uint64, state audit.KeyPhase, since time.Time) meshapi.KeyStatus {
	return meshapi.KeyStatus{Version: v, Serial: strconv.FormatUint(100+v, 10), State: string(state), Since: since,
		NotBefore: since.Add(-time.Minute), NotAfter: since.Add(time.Hour)}
}

// seg is a segment as the test writes it: state, start and end in seconds after t0
// (-1: open).
type seg struct {
	v          uint64
	state      audit.KeyPhase
	start, end int
}

func segmentsAt(t0 time.Time, segs []keySegment) []seg {
	out := make([]seg, 0, len(segs))
	for _, s := range segs {
		end := -1
		if !s.End.IsZero() {
			end = int(s.End.Sub(t0) / time.Second)
		}
		out = append(out, seg{s.Version, audit.KeyPhase(s.State), int(s.Start.Sub(t0) / time.Second), end})
	}
	return out
}

// The timeline accumulates a key's path from successive reports, keeps the first
// Since of each state, and keeps a key's past after the proxy stops reporting it.
func TestKeyTimelineAccumulates(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	pre, act, ovl, des := audit.PhasePreActivation, audit.PhaseActive, audit.PhaseOverlap, audit.PhaseDestroyed
	for _, tc := range []struct {
		name    string
		reports []*meshapi.ProxyStatus
		want    []seg
	}{
		{"one active key", []*meshapi.ProxyStatus{agentReport(key(1, act, at(0)))},
			[]seg{{1, pre, -60, 0}, {1, act, 0, -1}}},
		{"rotation: previous key in overlap", []*meshapi.ProxyStatus{
			agentReport(key(1, act, at(0))),
			agentReport(key(2, act, at(100)), key(1, ovl, at(100))),
		}, []seg{{1, pre, -60, 0}, {1, act, 0, 100}, {1, ovl, 100, -1}, {2, pre, 40, 100}, {2, act, 100, -1}}},
		{"destroyed, then no longer reported", []*meshapi.ProxyStatus{
			agentReport(key(1, act, at(0))),
			agentReport(key(2, act, at(100)), key(1, ovl, at(100))),
			agentReport(key(2, act, at(100)), key(1, des, at(130))),
			agentReport(key(2, act, at(100))),
		}, []seg{{1, pre, -60, 0}, {1, act, 0, 100}, {1, ovl, 100, 130}, {1, des, 130, 130}, {2, pre, 40, 100}, {2, act, 100, -1}}},
		{"a state reported again keeps its first since", []*meshapi.ProxyStatus{
			agentReport(key(1, act, at(0))),
			agentReport(key(1, act, at(50))),
		}, []seg{{1, pre, -60, 0}, {1, act, 0, -1}}},
		{"compromised without overlap", []*meshapi.ProxyStatus{
			agentReport(key(1, act, at(0))),
			agentReport(key(1, audit.PhaseCompromised, at(10))),
		}, []seg{{1, pre, -60, 0}, {1, act, 0, 10}, {1, audit.PhaseCompromised, 10, 10}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFleetStatus()
			for i, r := range tc.reports {
				if err := f.report(testTD, statusHost, r, at(i)); err != nil {
					t.Fatalf("report %d: %v", i, err)
				}
			}
			_, timeline, _ := f.view()
			if len(timeline) != 1 || timeline[0].SPIFFEID != statusAgent || timeline[0].Host != statusHost.String() {
				t.Fatalf("timeline %+v", timeline)
			}
			if got := segmentsAt(t0, timeline[0].Segments); !slices.Equal(got, tc.want) {
				t.Errorf("segments\n got %v\nwant %v", got, tc.want)
			}
		})
	}
}

// The timeline keeps the newest maxTimelineKeys versions of an identity.
func TestKeyTimelineBounded(t *testing.T) {
	t.Parallel()
	f := newFleetStatus()
	t0 := time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)
	for v := uint64(1); v <= maxTimelineKeys+4; v++ {
		if err := f.report(testTD, statusHost, agentReport(key(v, audit.PhaseActive, t0.Add(time.Duration(v)*time.Minute))), t0); err != nil {
			t.Fatal(err)
		}
	}
	_, timeline, _ := f.view()
	var versions []uint64
	for _, s := range timeline[0].Segments {
		if !slices.Contains(versions, s.Version) {
			versions = append(versions, s.Version)
		}
	}
	if len(versions) != maxTimelineKeys || versions[0] != 5 {
		t.Errorf("versions kept %v, want the %d newest", versions, maxTimelineKeys)
	}
}

func TestValidateProxyStatus(t *testing.T) {
	t.Parallel()
	now := time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)
	valid := func() *meshapi.ProxyStatus { return agentReport(key(1, audit.PhaseActive, now)) }
	for _, tc := range []struct {
		name   string
		change func(*meshapi.ProxyStatus)
		ok     bool
	}{
		{"valid", func(*meshapi.ProxyStatus) {}, true},
		{"no identities", func(s *meshapi.ProxyStatus) { s.Identities = nil }, true},
		{"version too long", func(s *meshapi.ProxyStatus) { s.Version = strings.Repeat("v", maxStatusVersion+1) }, false},
		{"control character", func(s *meshapi.ProxyStatus) { s.NotReady = "a\nb" }, false},
		{"markup is text", func(s *meshapi.ProxyStatus) { s.NotReady = "<script>alert(1)</script>" }, true},
		{"other trust domain", func(s *meshapi.ProxyStatus) { s.Identities[0].SPIFFEID = "spiffe://evil.test/x" }, false},
		{"not a SPIFFE ID", func(s *meshapi.ProxyStatus) { s.Identities[0].SPIFFEID = "host/a" }, false},
		{"identity twice", func(s *meshapi.ProxyStatus) { s.Identities = append(s.Identities, s.Identities[0]) }, false},
		{"too many identities", func(s *meshapi.ProxyStatus) {
			for i := range meshapi.MaxProxyStatusIdentities {
				s.Identities = append(s.Identities, meshapi.IdentityStatus{SPIFFEID: "spiffe://mesh.test/agent/" + strconv.Itoa(i)})
			}
		}, false},
		{"unknown state", func(s *meshapi.ProxyStatus) { s.Identities[0].Keys[0].State = "lost" }, false},
		{"serial not decimal", func(s *meshapi.ProxyStatus) { s.Identities[0].Keys[0].Serial = "0x12" }, false},
		{"key version twice", func(s *meshapi.ProxyStatus) {
			s.Identities[0].Keys = append(s.Identities[0].Keys, s.Identities[0].Keys[0])
		}, false},
		{"too many keys", func(s *meshapi.ProxyStatus) {
			for v := range maxStatusKeys {
				s.Identities[0].Keys = append(s.Identities[0].Keys, key(uint64(v)+2, audit.PhaseDestroyed, now))
			}
		}, false},
		{"time out of range", func(s *meshapi.ProxyStatus) {
			s.Identities[0].Keys[0].NotAfter = time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			st := valid()
			tc.change(st)
			err := validateProxyStatus(testTD, st)
			if (err == nil) != tc.ok {
				t.Errorf("validateProxyStatus = %v, want ok %v", err, tc.ok)
			}
			if err != nil && !errors.Is(err, errInvalidStatus) {
				t.Errorf("error %v does not wrap errInvalidStatus", err)
			}
		})
	}
}

// FuzzProxyStatus: a proxy's status never crashes the CA, and what the validation
// accepts is within bounds, stored, encoded as JSON and rendered by the page.
func FuzzProxyStatus(f *testing.F) {
	now := time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)
	for _, st := range []*meshapi.ProxyStatus{
		agentReport(key(1, audit.PhaseActive, now)),
		agentReport(key(2, audit.PhaseActive, now), key(1, audit.PhaseOverlap, now)),
		{Version: "v0", NotReady: "svid: not yet issued"},
	} {
		b, err := json.Marshal(st)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"version":"v","ready":true,"identities":[{"spiffe_id":"spiffe://mesh.test/host/a","ready":false,` +
		`"error":"<b>x</b>","keys":[{"version":1,"serial":"1","state":"destroyed","since":"9999-12-31T23:59:59+14:00",` +
		`"not_before":"0000-01-01T00:00:00Z","not_after":"0001-01-01T00:00:00Z"}]}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var st meshapi.ProxyStatus
		if err := json.Unmarshal(b, &st); err != nil {
			return
		}
		fs := newFleetStatus()
		if err := fs.report(testTD, statusHost, &st, now); err != nil {
			return
		}
		if len(st.Identities) > meshapi.MaxProxyStatusIdentities {
			t.Fatalf("accepted %d identities", len(st.Identities))
		}
		for _, is := range st.Identities {
			if len(is.Keys) > maxStatusKeys || len(is.Error) > maxStatusText {
				t.Fatalf("accepted an identity out of bounds: %d keys, error of %d bytes", len(is.Keys), len(is.Error))
			}
		}
		hosts, timeline, _ := fs.view()
		doc := statusDoc{Now: now, Timeline: timeline, Identities: identityRows(statusHost, hosts[statusHost].status),
			Fleet: []fleetRow{fleetRowOf(meshapi.DirectoryEntry{SPIFFEID: statusHost}, hosts[statusHost])}}
		if _, err := json.Marshal(doc); err != nil {
			t.Fatalf("accepted a status the document cannot encode: %v", err)
		}
		if err := statusTemplate.Execute(io.Discard, doc); err != nil {
			t.Fatalf("accepted a status the page cannot render: %v", err)
		}
	})
}
