package meshapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"strconv"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Fuzz targets for every request body of the mesh API and of the CA's admin socket.
// Each checks that the decoder and the validation never panic, that input which is not
// one JSON object of the body's fields is refused, and that what is accepted survives
// an encode and decode unchanged (and, where the CA normalises it, normalises to the
// same value again).

// fuzzBody decodes data as the CA does (DecodeStrict into T) and, when it is accepted,
// checks it round-trips; it returns the decoded value and whether it was accepted.
func fuzzBody[T any](t *testing.T, data []byte) (T, bool) {
	var v T
	if err := DecodeStrict(bytes.NewReader(data), &v); err != nil {
		return v, false
	}
	if !json.Valid(data) {
		t.Fatalf("accepted invalid JSON %q", data)
	}
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("accepted %q, cannot encode %+v: %v", data, v, err)
	}
	var back T
	if err := DecodeStrict(bytes.NewReader(b), &back); err != nil {
		t.Fatalf("accepted %q, refused its encoding %s: %v", data, b, err)
	}
	if !reflect.DeepEqual(normalise(v), normalise(back)) {
		t.Fatalf("round trip of %q: %+v, then %+v", data, v, back)
	}
	return v, true
}

// normalise re-encodes v, so that nil and empty slices compare equal.
func normalise(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// seedBodies adds the common malformed bodies besides a target's own seeds.
func seedBodies(f *testing.F, good ...string) {
	for _, s := range append(good, ``, `null`, `[]`, `{}`, `{"unknown":1}`, `{} {}`, `{"a":`, "\x00", `"string"`) {
		f.Add([]byte(s))
	}
}

func FuzzRegisterRequest(f *testing.F) {
	seedBodies(f,
		`{"addresses":["10.0.0.2","fd00::2"],"tunnel_port":15008,"transports":["tls"]}`,
		`{"addresses":["::ffff:10.0.0.2","10.0.0.2"],"tunnel_port":15008,"transports":["quic","h2","quic","tls"],"bundle_version":"2030-01-01T00:00:00Z/3"}`,
		`{"addresses":["fe80::1%eth0"],"tunnel_port":15008}`,
		`{"addresses":["10.0.0.2"],"tunnel_port":70000}`,
		`{"addresses":["224.0.0.1"],"tunnel_port":1,"transports":["TLS"]}`)
	f.Fuzz(func(t *testing.T, data []byte) {
		req, ok := fuzzBody[RegisterRequest](t, data)
		if !ok {
			return
		}
		reg, err := ParseRegistration(idA, req)
		if err != nil {
			return
		}
		// What the CA stores parses again to itself: normalisation is idempotent.
		again := RegisterRequest{TunnelPort: int(reg.TunnelPort), Transports: reg.Transports, BundleVersion: reg.BundleVersion}
		for _, a := range reg.Addresses {
			again.Addresses = append(again.Addresses, a.String())
		}
		reg2, err := ParseRegistration(idA, again)
		if err != nil || !reflect.DeepEqual(reg, reg2) {
			t.Fatalf("registration %+v parses again to %+v, %v", reg, reg2, err)
		}
		if len(reg.Addresses) == 0 || reg.TunnelPort == 0 || len(reg.Transports) == 0 {
			t.Fatalf("accepted an empty registration %+v from %q", reg, data)
		}
	})
}

func FuzzWatchQuery(f *testing.F) {
	for _, s := range [][2]string{{"", ""}, {"7", "25s"}, {"18446744073709551615", "0s"}, {"18446744073709551616", ""},
		{"-1", ""}, {"x", ""}, {"", "-1s"}, {"", "1h"}, {"", "25"}, {" 7", ""}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, since, wait string) {
		v, d, err := ParseWatchQuery(since, wait)
		if err != nil {
			return
		}
		if d < 0 || d > MaxWatchWait {
			t.Fatalf("wait %q gave %v, outside [0, %v]", wait, d, MaxWatchWait)
		}
		if since != "" && strconv.FormatUint(v, 10) != since {
			if _, err := strconv.ParseUint(since, 10, 64); err != nil {
				t.Fatalf("since %q accepted as %d", since, v)
			}
		}
		// The canonical form of what was accepted is accepted as the same.
		v2, d2, err := ParseWatchQuery(strconv.FormatUint(v, 10), d.String())
		if err != nil || v2 != v || d2 != d {
			t.Fatalf("since=%d wait=%v parse again to %d %v %v", v, d, v2, d2, err)
		}
	})
}

// fuzzChecked is fuzzBody for a body with a Check method: it reports whether data
// decoded and passed Check, and fails the test on a refusal the CA would not answer
// 400.
func fuzzChecked[T interface {
	Check(spiffeid.TrustDomain) (spiffeid.ID, error)
}](t *testing.T, data []byte) (T, spiffeid.ID, bool) {
	req, ok := fuzzBody[T](t, data)
	if !ok {
		return req, spiffeid.ID{}, false
	}
	id, err := req.Check(testTD)
	if err != nil && !errors.Is(err, ErrInvalidRequest) && !errors.Is(err, ErrInvalidID) {
		t.Fatalf("refusal %v wraps neither ErrInvalidRequest nor ErrInvalidID", err)
	}
	return req, id, err == nil
}

func FuzzRevokeRequest(f *testing.F) {
	seedBodies(f,
		`{"spiffe_id":"spiffe://mesh.test/host/b","reason":"key compromised"}`,
		`{"serial":"123456789","reason":"r"}`,
		`{"spiffe_id":"spiffe://mesh.test/host/b","except":"42","reason":"rotate"}`,
		`{"spiffe_id":"spiffe://mesh.test/host/b","serial":"1","reason":"r"}`,
		`{"serial":"0x1","reason":"r"}`, `{"serial":"01","reason":"r"}`,
		`{"spiffe_id":"spiffe://other.test/host/b","reason":"r"}`,
		`{"spiffe_id":"spiffe://mesh.test/host/b","reason":"line\nbreak"}`)
	f.Fuzz(func(t *testing.T, data []byte) {
		req, id, ok := fuzzChecked[RevokeRequest](t, data)
		switch {
		case !ok:
		case (req.SPIFFEID == "") == (req.Serial == ""), !ValidReason(req.Reason) || req.Reason == "":
			t.Fatalf("accepted %+v", req)
		case req.Serial == "" && (id.IsZero() || !id.MemberOf(testTD) || id.String() != req.SPIFFEID):
			t.Fatalf("accepted %+v as identity %v", req, id)
		case req.Serial != "" && !CanonicalSerial(req.Serial):
			t.Fatalf("accepted serial %q", req.Serial)
		}
	})
}

func FuzzReinstateRequest(f *testing.F) {
	seedBodies(f,
		`{"spiffe_id":"spiffe://mesh.test/host/b","reason":"new key"}`,
		`{"spiffe_id":"spiffe://mesh.test/host/b"}`,
		`{"spiffe_id":"spiffe://mesh.test","reason":"r"}`,
		`{"spiffe_id":"not an id","reason":"r"}`)
	f.Fuzz(func(t *testing.T, data []byte) {
		req, id, ok := fuzzChecked[ReinstateRequest](t, data)
		switch {
		case !ok:
		case req.Reason == "" || !ValidReason(req.Reason) || id.String() != req.SPIFFEID || !id.MemberOf(testTD):
			t.Fatalf("accepted %+v as %v", req, id)
		}
	})
}

func FuzzAgentTokenRequest(f *testing.F) {
	seedBodies(f, `{"id":"spiffe://mesh.test/agent/x"}`, `{"id":""}`, `{"id":"spiffe://mesh.test/agent/x","host":"h"}`)
	f.Fuzz(func(t *testing.T, data []byte) {
		req, ok := fuzzBody[AgentTokenRequest](t, data)
		if !ok {
			return
		}
		// The CA parses the ID as the agent's: any string decodes, and a parsed ID
		// prints back as itself.
		if id, err := spiffeid.FromString(req.ID); err == nil && id.String() != req.ID {
			t.Fatalf("id %q parses to %v", req.ID, id)
		}
	})
}

func FuzzTokenRequest(f *testing.F) {
	seedBodies(f, `{"spiffe_id":"spiffe://mesh.test/workload/a"}`, `{"spiffe_id":1}`)
	f.Fuzz(func(t *testing.T, data []byte) { fuzzBody[TokenRequest](t, data) })
}

func FuzzEntryRequest(f *testing.F) {
	seedBodies(f,
		`{"id":"spiffe://mesh.test/agent/x","host":"spiffe://mesh.test/host/a","uid":1000,"port":8080}`,
		`{"id":"spiffe://mesh.test/agent/z","host":"spiffe://mesh.test/host/a"}`,
		`{"id":"spiffe://mesh.test/agent/x","host":"spiffe://mesh.test/host/a","uid":-1}`,
		`{"id":"spiffe://mesh.test/agent/x","host":"spiffe://mesh.test/host/a","uid":0,"port":70000}`,
		`{"id":"not an id","host":"spiffe://mesh.test/host/a","uid":0}`)
	f.Fuzz(func(t *testing.T, data []byte) {
		req, ok := fuzzBody[EntryRequest](t, data)
		if ok && !req.ID.IsZero() && req.ID.String() == "" {
			t.Fatalf("accepted an id that does not print: %+v", req)
		}
	})
}

func FuzzHostClaimRequest(f *testing.F) {
	seedBodies(f,
		`{"host":"spiffe://mesh.test/host/a","addresses":["10.0.0.0/24","fd00::/64"]}`,
		`{"host":"spiffe://mesh.test/host/a","addresses":["10.0.0.1"]}`,
		`{"host":"spiffe://mesh.test/host/a","addresses":[]}`,
		`{"host":"spiffe://mesh.test/host/a","addresses":["nonsense"]}`)
	f.Fuzz(func(t *testing.T, data []byte) { fuzzBody[HostClaimRequest](t, data) })
}

// The seeds run as ordinary tests too: each malformed one is refused, each good one
// accepted.
func TestRequestBodySeeds(t *testing.T) {
	t.Parallel()
	// null decodes to the zero body, which validation then refuses.
	for _, bad := range []string{``, `[]`, `{"unknown":1}`, `{} {}`, `{"a":`, "\x00", `"string"`} {
		if _, ok := fuzzBody[RevokeRequest](t, []byte(bad)); ok {
			t.Errorf("revoke body %q accepted", bad)
		}
		if _, ok := fuzzBody[RegisterRequest](t, []byte(bad)); ok {
			t.Errorf("register body %q accepted", bad)
		}
	}
	if _, ok := fuzzBody[EntryRequest](t, []byte(`{"id":"spiffe://mesh.test/agent/x","host":"spiffe://mesh.test/host/a","uid":1000,"port":8080}`)); !ok {
		t.Error("a good entry body refused")
	}
	if _, _, err := ParseWatchQuery("", "61s"); err != nil {
		t.Errorf("a long wait is capped, not refused: %v", err)
	}
	if _, d, _ := ParseWatchQuery("", "1h"); d != MaxWatchWait {
		t.Errorf("wait 1h gave %v, want the cap %v", d, MaxWatchWait)
	}
}
