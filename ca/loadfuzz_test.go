package ca

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"testing/cryptotest"
	"time"
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
	f.Add(mustJSON(f, entriesFile{Entries: []Entry{{ID: agentX, Host: idA, UID: 1000, Port: 8080}}}))
	f.Add(mustJSON(f, entriesFile{Entries: []Entry{{ID: agentX, Host: idA, UID: 1000}, {ID: agentY, Host: idB, UID: 1}}}))
	f.Add(mustJSON(f, entriesFile{Entries: []Entry{{ID: agentX, Host: idA, UID: 1000}, {ID: agentY, Host: idA, UID: 1000}}})) // conflict
	f.Add([]byte(`{"entries":[]}`))
	f.Add([]byte(`{"entries":[{"id":"spiffe://evil.test/agent/x","host":"spiffe://mesh.test/host/a"}]}`))
	f.Add([]byte(`{"entries":null,"extra":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		roundTrip(t, b, func(b []byte) ([]Entry, error) {
			set, err := parseEntriesFile(testTD, fuzzPath, b)
			if err != nil {
				return nil, err
			}
			return set.sorted, nil
		}, func(es []Entry) any { return entriesFile{Entries: es} }, slicesEqualOrEmpty[Entry])
	})
}

// FuzzClaimsFile: claims.json as storeClaims writes it.
func FuzzClaimsFile(f *testing.F) {
	f.Add([]byte(`{"hosts":[{"host":"spiffe://mesh.test/host/a","prefixes":["10.0.0.0/24","fd00::/64"],"source":"admin","at":"2030-01-01T00:00:00Z"}]}`))
	f.Add([]byte(`{"hosts":[{"host":"spiffe://mesh.test/host/b","prefixes":["192.0.2.5/32"],"source":"learnt","from":"192.0.2.5","at":"2030-01-01T00:00:00Z"}]}`))
	f.Add([]byte(`{"hosts":[{"host":"spiffe://mesh.test/host/a","prefixes":["10.0.0.0/24"],"source":"admin","at":"2030-01-01T00:00:00Z"},{"host":"spiffe://mesh.test/host/b","prefixes":["10.0.0.5/32"],"source":"admin","at":"2030-01-01T00:00:00Z"}]}`))
	f.Add([]byte(`{"hosts":[]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		roundTrip(t, b, func(b []byte) ([]HostClaim, error) {
			set, err := parseClaimsFile(testTD, fuzzPath, b)
			if err != nil {
				return nil, err
			}
			return set.sorted, nil
		}, func(hs []HostClaim) any { return claimsFile{Hosts: hs} }, slicesEqualOrEmpty[HostClaim])
	})
}

// FuzzFleetRotationFile: fleet-rotation.json as RotateFleet writes it.
func FuzzFleetRotationFile(f *testing.F) {
	at := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	f.Add(mustJSON(f, FleetRotation{ID: 10, At: at, Reason: "quarterly"}))
	f.Add(mustJSON(f, FleetRotation{ID: nextFleetID(10, at), At: at.Add(time.Hour), Reason: ""}))
	f.Add(mustJSON(f, FleetRotation{ID: 0, At: at}))
	f.Add([]byte(`{"id":1,"at":"2030-01-01T00:00:00Z","reason":"bell\u0007"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		roundTrip(t, b, func(b []byte) (*FleetRotation, error) { return parseFleetRotationFile(fuzzPath, b) },
			func(fr *FleetRotation) any { return fr }, func(a, b *FleetRotation) bool {
				return a.ID == b.ID && a.At.Equal(b.At) && a.Reason == b.Reason
			})
	})
}

// FuzzDenyListFile: denylist.json as publish writes it. The fuzzed payload is also
// signed correctly, so that the decoder behind the signature check is reached.
func FuzzDenyListFile(f *testing.F) {
	ca := newListCA(f, testTD)
	good := ca.sign(f, sampleList())
	f.Add(mustJSON(f, good), good.Payload)
	empty := ca.sign(f, &DenyList{TrustDomain: testTD.Name(), Version: 1, IssuedAt: listT0, IDs: []DeniedID{}, Serials: []DeniedSerial{}})
	f.Add(mustJSON(f, empty), empty.Payload)
	f.Add([]byte(`{"payload":"e30=","signature":"","signer":""}`), []byte(`{}`))
	roots := []*x509.Certificate{ca.root}
	now := time.Now()
	load := func(t *testing.T, b []byte) {
		t.Helper()
		st, err := parseDenyListFile(fuzzPath, b, testTD, roots, now)
		if err != nil {
			refusedNamingFile(t, err)
			return
		}
		// The file is served as read: what is accepted is kept byte for byte, and its
		// list verifies again once the CA re-signs it.
		if !bytes.Equal(st.encoded, b) {
			t.Fatal("the accepted file is not served as read")
		}
		checkReencodes(t, ca, st.list)
	}
	f.Fuzz(func(t *testing.T, file, payload []byte) {
		// Deterministic signatures: coverage that changes with a random nonce makes
		// every input look new and the fuzzer spend its time minimising them.
		cryptotest.SetGlobalRandom(t, 1)
		load(t, file)
		sig, err := ca.interKey.Sign(rand.Reader, denyListDigest(payload), crypto.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		load(t, mustJSON(t, SignedDenyList{Payload: payload, Signature: sig, Signer: ca.inter.Raw}))
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
