package ca

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/meshapi"
)

// The files New loads from the state directory (entries.json, claims.json,
// fleet-rotation.json, denylist.json) are written atomically by the CA, so a file it
// cannot take was edited by hand or tampered with: the loader must refuse it with an
// error that names the file, never panic, and what it accepts must survive the CA
// writing it back.

// fuzzPath is the path the fuzzed loaders are told they read.
const fuzzPath = "/state/fuzzed.json"

// refusedNamingFile fails t unless err names the file.
func refusedNamingFile(t *testing.T, err error) {
	t.Helper()
	if !strings.Contains(err.Error(), fuzzPath) {
		t.Fatalf("refusal does not name the file: %v", err)
	}
}

func mustJSON(tb testing.TB, v any) []byte {
	tb.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// FuzzEntriesFile: entries.json as storeEntries writes it.
func FuzzEntriesFile(f *testing.F) {
	f.Add(mustJSON(f, entriesFile{Entries: []meshapi.Entry{{ID: agentX, Host: idA, UID: 1000, Port: 8080}}}))
	f.Add(mustJSON(f, entriesFile{Entries: []meshapi.Entry{{ID: agentX, Host: idA, UID: 1000}, {ID: agentY, Host: idB, UID: 1}}}))
	f.Add(mustJSON(f, entriesFile{Entries: []meshapi.Entry{{ID: agentX, Host: idA, UID: 1000}, {ID: agentY, Host: idA, UID: 1000}}})) // conflict
	f.Add([]byte(`{"entries":[]}`))
	f.Add([]byte(`{"entries":[{"id":"spiffe://evil.test/agent/x","host":"spiffe://mesh.test/host/a"}]}`))
	f.Add([]byte(`{"entries":null,"extra":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		roundTrip(t, b, func(b []byte) ([]meshapi.Entry, error) {
			set, err := parseEntriesFile(testTD, fuzzPath, b)
			if err != nil {
				return nil, err
			}
			return set.sorted, nil
		}, func(es []meshapi.Entry) any { return entriesFile{Entries: es} }, slicesEqualOrEmpty[meshapi.Entry])
	})
}

// FuzzClaimsFile: claims.json as storeClaims writes it.
func FuzzClaimsFile(f *testing.F) {
	f.Add([]byte(`{"hosts":[{"host":"spiffe://mesh.test/host/a","prefixes":["10.0.0.0/24","fd00::/64"],"source":"admin","at":"2030-01-01T00:00:00Z"}]}`))
	f.Add([]byte(`{"hosts":[{"host":"spiffe://mesh.test/host/b","prefixes":["192.0.2.5/32"],"source":"learnt","from":"192.0.2.5","at":"2030-01-01T00:00:00Z"}]}`))
	f.Add([]byte(`{"hosts":[{"host":"spiffe://mesh.test/host/a","prefixes":["10.0.0.0/24"],"source":"admin","at":"2030-01-01T00:00:00Z"},{"host":"spiffe://mesh.test/host/b","prefixes":["10.0.0.5/32"],"source":"admin","at":"2030-01-01T00:00:00Z"}]}`))
	f.Add([]byte(`{"hosts":[]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		roundTrip(t, b, func(b []byte) ([]meshapi.HostClaim, error) {
			set, err := parseClaimsFile(testTD, fuzzPath, b)
			if err != nil {
				return nil, err
			}
			return set.sorted, nil
		}, func(hs []meshapi.HostClaim) any { return claimsFile{Hosts: hs} }, slicesEqualOrEmpty[meshapi.HostClaim])
	})
}

// FuzzFleetRotationFile: fleet-rotation.json as RotateFleet writes it.
func FuzzFleetRotationFile(f *testing.F) {
	at := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	f.Add(mustJSON(f, meshapi.FleetRotation{ID: 10, At: at, Reason: "quarterly"}))
	f.Add(mustJSON(f, meshapi.FleetRotation{ID: nextFleetID(10, at), At: at.Add(time.Hour), Reason: ""}))
	f.Add(mustJSON(f, meshapi.FleetRotation{ID: 0, At: at}))
	f.Add([]byte(`{"id":1,"at":"2030-01-01T00:00:00Z","reason":"bell\u0007"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		roundTrip(t, b, func(b []byte) (*meshapi.FleetRotation, error) { return parseFleetRotationFile(fuzzPath, b) },
			func(fr *meshapi.FleetRotation) any { return fr }, func(a, b *meshapi.FleetRotation) bool {
				return a.ID == b.ID && a.At.Equal(b.At) && a.Reason == b.Reason
			})
	})
}

// roundTrip checks a loader on the content b: parse refuses it with an error naming the
// file, or what it accepts, written back as the CA writes it (the JSON of file), is
// accepted again and the same.
func roundTrip[T any](t *testing.T, b []byte, parse func([]byte) (T, error), file func(T) any, same func(a, b T) bool) {
	t.Helper()
	v, err := parse(b)
	if err != nil {
		refusedNamingFile(t, err)
		return
	}
	again, err := parse(mustJSON(t, file(v)))
	if err != nil {
		t.Fatalf("accepted content refused once written back: %v", err)
	}
	if !same(v, again) {
		t.Fatalf("writing back changed the content: %+v -> %+v", v, again)
	}
}

// slicesEqualOrEmpty is reflect.DeepEqual that does not tell nil from empty.
func slicesEqualOrEmpty[T any](a, b []T) bool {
	if len(a) == 0 && len(b) == 0 {
		return true
	}
	return reflect.DeepEqual(a, b)
}
