package rotator

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/hsm"
	"github.com/agentmesh/agentmesh/internal/metrictest"
	"github.com/agentmesh/agentmesh/internal/softhsmtest"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/policy"
)

// *hsm.Keys is the key store a proxy keeps its SVID keys in across restarts.
var _ PersistentKeys = (*hsm.Keys)(nil)

// token is the one SoftHSM directory of this test process: each test uses it with a
// key label prefix of its own. TestMain removes it.
var token = softhsmtest.Dir{Pattern: "agentmesh-rotator-", Label: "rotator-test"}

func TestMain(m *testing.M) {
	m.Run() // its result becomes the exit code when TestMain returns
	token.Remove()
}

// tokenKeys opens a key store on the test token with prefix; the test's cleanup closes
// it. Opening another one with the same prefix after closing this one is what a
// restarted process does.
func tokenKeys(t *testing.T, prefix string) *hsm.Keys {
	t.Helper()
	_, uri := token.Token(t)
	keys, err := hsm.OpenKeys(t.Context(), uri, prefix)
	if err != nil {
		t.Fatalf("OpenKeys: %v", err)
	}
	t.Cleanup(func() { _ = keys.Close() })
	return keys
}

// eventually polls cond until it holds, failing the test after a generous deadline.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond) //nolint:forbidigo // the poll interval of a wait on a condition
	}
}

// rotation returns the first rotation record with trigger and result.
func (r *records) rotation(trigger Trigger, result audit.Result) *audit.Rotation {
	for _, rec := range r.all() {
		if rec.Trigger == string(trigger) && rec.Result == result {
			return rec
		}
	}
	return nil
}

// A restarted rotator starts from the SVID the previous one stored: it presents it at
// once, before the CA answers anything, with the key the previous process made in the
// token, then renews it with itself (trigger restart) instead of enrolling.
func TestRestartRenewsStoredSVID(t *testing.T) {
	prefix := "restart-" + randomLabel() + "-"
	file := filepath.Join(t.TempDir(), "svid.json")
	iss := newIssuer(t, time.Hour)

	keys := tokenKeys(t, prefix)
	first, firstRec, stop := run(t, iss, Config{Keys: keys, StateFile: file})
	eventually(t, "the first rotator enrolled", func() bool { return first.Ready() == nil })
	enrolled := firstRec.rotation(TriggerEnroll, "ok")
	eventually(t, "the SVID is stored", func() bool { _, err := os.Stat(file); return err == nil })
	fi, err := os.Stat(file)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("state file mode %v, want 0600", fi.Mode().Perm())
	}
	content, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(content, []byte("PRIVATE KEY")) || !bytes.Contains(content, []byte(enrolled.NewSerial)) {
		t.Errorf("state file holds a private key, or not the serial %s:\n%s", enrolled.NewSerial, content)
	}
	stop()
	if err := keys.Close(); err != nil { // the process ends
		t.Fatal(err)
	}

	// The CA is unreachable while the restarted process starts: the stored SVID serves.
	iss.set(func(i *issuer) { i.fail = errors.New("ca unreachable") })
	reg := prometheus.NewRegistry()
	second, rec, _ := run(t, iss, Config{Keys: tokenKeys(t, prefix), StateFile: file, Registerer: reg,
		Policy: policy.RotationPolicy{RetryMin: 10 * time.Millisecond, RetryMax: 50 * time.Millisecond}})
	eventually(t, "the stored SVID is presented", func() bool { return second.Ready() == nil })
	svid, err := second.GetX509SVID()
	if err != nil || svid.Certificates[0].SerialNumber.String() != enrolled.NewSerial {
		t.Fatalf("restarted rotator presents %v (%v), want the stored serial %s", svid, err, enrolled.NewSerial)
	}
	if st := second.Status(); st.Current == nil || st.Current.Cause != CauseRestored || st.Current.State != StateActive {
		t.Errorf("status of the restored SVID: %+v, want active, cause restored", st.Current)
	}
	if n := metrictest.Value(t, reg, metricRestores, labelResult, string(RestoreValid)); n != 1 {
		t.Errorf("restores{result=restored} = %v, want 1", n)
	}

	iss.set(func(i *issuer) { i.fail = nil })
	eventually(t, "the stored SVID is renewed", func() bool { return rec.rotation(TriggerRestart, "ok") != nil })
	renewed := rec.rotation(TriggerRestart, "ok")
	if renewed.OldSerial != enrolled.NewSerial {
		t.Errorf("renewed from %s, want the stored serial %s", renewed.OldSerial, enrolled.NewSerial)
	}
	if enrolls, _ := iss.counts(); enrolls != 1 {
		t.Errorf("%d enrolments, want the first rotator's only", enrolls)
	}
	if ks := rec.keyStates(1); len(ks) == 0 || ks[0].From != "" || ks[0].To != StateActive || ks[0].Cause != string(CauseRestored) ||
		ks[0].Serial != enrolled.NewSerial {
		t.Errorf("key_state records of the restored key: %+v, want it restored as active", ks)
	}
	// The new SVID replaces the stored one, so the next restart renews it in turn.
	eventually(t, "the renewed SVID is stored", func() bool {
		b, err := os.ReadFile(file)
		return err == nil && bytes.Contains(b, []byte(renewed.NewSerial))
	})
}

// A stored SVID that expired while the process was down is never presented: its key is
// destroyed and the identity enrols. While the CA refuses the enrolment for good (the
// token was used), the identity is not ready and says a new token is needed; once an
// enrolment succeeds it is ready again.
func TestRestartExpiredStoredSVIDEnrols(t *testing.T) {
	prefix := "expired-" + randomLabel() + "-"
	file := filepath.Join(t.TempDir(), "svid.json")
	iss := newIssuer(t, time.Hour)
	keys := tokenKeys(t, prefix)
	key, err := keys.NewKey(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	chain := iss.ca.Issue(t, hostA, key.Public(), testca.WithNotBefore(time.Now().Add(-2*time.Hour)), testca.WithLifetime(time.Hour))
	ref, err := keys.Ref(key)
	if err != nil {
		t.Fatal(err)
	}
	b, err := encodeStored(&x509svid.SVID{ID: hostA, Certificates: chain, PrivateKey: key}, ref)
	if err != nil {
		t.Fatal(err)
	}
	writeState(t, file, b)
	expiredSerial := chain[0].SerialNumber.String()

	iss.set(func(i *issuer) { i.fail = usedToken{} })
	reg := prometheus.NewRegistry()
	r, rec, _ := run(t, iss, Config{Keys: keys, StateFile: file, Registerer: reg,
		Policy: policy.RotationPolicy{RetryMin: 10 * time.Millisecond, RetryMax: 50 * time.Millisecond}})
	eventually(t, "the enrolment is refused", func() bool { return r.Status().NeedsToken })
	st := r.Status()
	if st.Ready || !strings.Contains(st.Error, "new bootstrap token") {
		t.Errorf("status while the token is used: ready=%t error=%q; want not ready, saying a new token is needed", st.Ready, st.Error)
	}
	if err := r.Ready(); !errors.Is(err, ErrExpired) {
		t.Errorf("Ready = %v, want ErrExpired: the expired SVID is never presented", err)
	}
	if g := metrictest.Value(t, reg, metricNeedsToken); g != 1 {
		t.Errorf("needs_token gauge = %v, want 1", g)
	}
	if n := metrictest.Value(t, reg, metricRestores, labelResult, string(RestoreExpired)); n != 1 {
		t.Errorf("restores{result=expired} = %v, want 1", n)
	}
	refused := rec.rotation(TriggerExpired, "error")
	if refused == nil || refused.OldSerial != expiredSerial || !strings.Contains(refused.Reason, "new bootstrap token") {
		t.Errorf("refused enrolment record %+v, want trigger expired from %s, saying a new token is needed", refused, expiredSerial)
	}
	eventually(t, "the expired SVID's key is destroyed", func() bool {
		_, err := keys.Open(t.Context(), ref)
		return errors.Is(err, hsm.ErrKeyNotFound)
	})

	// An operator wrote a new token.
	iss.set(func(i *issuer) { i.fail = nil })
	eventually(t, "the identity enrolled", func() bool { return r.Ready() == nil })
	if st := r.Status(); st.NeedsToken {
		t.Errorf("needs_token still set after the enrolment: %+v", st)
	}
	if g := metrictest.Value(t, reg, metricNeedsToken); g != 0 {
		t.Errorf("needs_token gauge = %v after the enrolment, want 0", g)
	}
	if ok := rec.rotation(TriggerExpired, "ok"); ok == nil || ok.OldSerial != expiredSerial {
		t.Errorf("enrolment record %+v, want trigger expired from %s", ok, expiredSerial)
	}
	if _, renews := iss.counts(); renews != 0 {
		t.Errorf("%d renewals of an expired SVID", renews)
	}
}

// A state file that cannot serve is not an error of the rotator: it enrols, and the
// restore is counted as unusable.
func TestRestartUnusableStateEnrols(t *testing.T) {
	prefix := "unusable-" + randomLabel() + "-"
	keys := tokenKeys(t, prefix)
	iss := newIssuer(t, time.Hour)
	other := testca.New(t)
	hostB := spiffeid.RequireFromString("spiffe://example.org/host/b")
	stored := func(id spiffeid.ID, ca *testca.CA) []byte {
		key, err := keys.NewKey(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		ref, err := keys.Ref(key)
		if err != nil {
			t.Fatal(err)
		}
		b, err := encodeStored(&x509svid.SVID{ID: id, Certificates: ca.Issue(t, id, key.Public()), PrivateKey: key}, ref)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	// A key reference of another store (another prefix) names no key of this one.
	foreign := bytes.Replace(stored(hostA, iss.ca), []byte(prefix), []byte("other-"), 1)
	for _, tc := range []struct {
		name    string
		content []byte
	}{
		{"garbage", []byte("not json")},
		{"another identity", stored(hostB, iss.ca)},
		{"another trust anchor", stored(hostA, other)},
		{"key not in the store", foreign},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "svid.json")
			writeState(t, file, tc.content)
			reg := prometheus.NewRegistry()
			r, rec, _ := run(t, iss, Config{Keys: keys, StateFile: file, Registerer: reg})
			eventually(t, "the identity enrolled", func() bool { return rec.rotation(TriggerEnroll, "ok") != nil })
			if err := r.Ready(); err != nil {
				t.Errorf("Ready after enrolling: %v", err)
			}
			if n := metrictest.Value(t, reg, metricRestores, labelResult, string(RestoreUnusable)); n != 1 {
				t.Errorf("restores{result=unusable} = %v, want 1", n)
			}
			// The enrolled SVID replaces what was there.
			eventually(t, "the new SVID is stored", func() bool {
				b, err := os.ReadFile(file)
				return err == nil && bytes.Contains(b, []byte(rec.rotation(TriggerEnroll, "ok").NewSerial))
			})
		})
	}
}

// A revoked or compromised SVID is removed from the state file at once: a restart must
// not bring it back.
func TestDroppedSVIDForgotten(t *testing.T) {
	for _, tc := range []struct {
		name string
		drop func(t *testing.T, r *Rotator, serial string)
	}{
		{"revoked", func(t *testing.T, r *Rotator, serial string) {
			if n := r.Revoke(bySerial(serial)); n != 1 {
				t.Fatalf("Revoke dropped %d SVIDs, want 1", n)
			}
		}},
		{"compromised", func(t *testing.T, r *Rotator, _ string) {
			// Already while the renewal is in flight: a crash then must not restore it.
			gate := make(chan struct{})
			openGate := sync.OnceFunc(func() { close(gate) })
			t.Cleanup(openGate) // before Run is stopped, should the test fail while it waits
			r.cfg.Issuer.(*issuer).set(func(i *issuer) { i.gate = gate })
			done := make(chan error, 1)
			go func() {
				_, err := r.Rotate(t.Context(), RotateRequest{Trigger: TriggerCompromise, Actor: audit.Actor{Initiator: "test"}})
				done <- err
			}()
			eventually(t, "the compromised SVID is removed before the renewal ends", func() bool {
				_, err := os.Stat(r.cfg.StateFile)
				return errors.Is(err, os.ErrNotExist)
			})
			openGate()
			if err := <-done; err == nil {
				t.Fatal("the rotation succeeded with the CA refusing")
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			keys := tokenKeys(t, tc.name+"-"+randomLabel()+"-")
			file := filepath.Join(t.TempDir(), "svid.json")
			iss := newIssuer(t, time.Hour)
			r, rec, _ := run(t, iss, Config{Keys: keys, StateFile: file})
			eventually(t, "the SVID is stored", func() bool { _, err := os.Stat(file); return err == nil })
			// Nothing replaces the file: the CA refuses what follows.
			iss.set(func(i *issuer) { i.fail = revokedErr{} })
			tc.drop(t, r, rec.rotation(TriggerEnroll, "ok").NewSerial)
			eventually(t, "the stored SVID is removed", func() bool {
				_, err := os.Stat(file)
				return errors.Is(err, os.ErrNotExist)
			})
		})
	}
}

// StateFile needs keys that outlive the process: memory keys cannot be found again.
func TestStateFileNeedsPersistentKeys(t *testing.T) {
	iss := newIssuer(t, time.Hour)
	_, err := New(Config{ID: hostA, Issuer: iss, Bundle: iss.ca.Bundle(), StateFile: filepath.Join(t.TempDir(), "svid.json")})
	if err == nil {
		t.Fatal("New accepted a StateFile with in-memory keys")
	}
}

// decodeStored refuses, without panicking, every file that is not a stored SVID of the
// identity.
func TestDecodeStored(t *testing.T) {
	svid := testca.New(t).SVID(t, hostA)
	good, err := encodeStored(svid, "svid-ref")
	if err != nil {
		t.Fatal(err)
	}
	ref, certs, err := decodeStored(good, hostA)
	if err != nil || ref != "svid-ref" || len(certs) != 2 || !certs[0].Equal(svid.Certificates[0]) {
		t.Fatalf("decodeStored(encodeStored) = %q, %d certs, %v", ref, len(certs), err)
	}
	// changed returns the good file with f applied to its content.
	changed := func(f func(*storedSVID)) []byte {
		var st storedSVID
		if err := json.Unmarshal(good, &st); err != nil {
			t.Fatal(err)
		}
		f(&st)
		b, err := json.Marshal(st)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, tc := range []struct {
		name    string
		content []byte
	}{
		{"empty", nil},
		{"not json", []byte("{")},
		{"unknown field", bytes.Replace(good, []byte(`"format"`), []byte(`"extra": 1, "format"`), 1)},
		{"other format", changed(func(s *storedSVID) { s.Format = 2 })},
		{"other identity", changed(func(s *storedSVID) { s.SPIFFEID = "spiffe://example.org/host/b" })},
		{"no key", changed(func(s *storedSVID) { s.Key = "" })},
		{"no certificate", changed(func(s *storedSVID) { s.Chain = nil })},
		{"not a certificate", changed(func(s *storedSVID) { s.Chain[1] = []byte("x") })},
		{"leaf dropped", changed(func(s *storedSVID) { s.Chain = s.Chain[1:] })},
		{"other serial", changed(func(s *storedSVID) { s.Serial = "1" })},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, _, err := decodeStored(tc.content, hostA); err == nil {
				t.Errorf("decodeStored accepted %q", tc.content)
			}
		})
	}
}

// usedToken is the CA's refusal of a bootstrap token it has seen already.
type usedToken struct{}

func (usedToken) Error() string   { return "ca: sign: 401 token already used" }
func (usedToken) Permanent() bool { return true }

func writeState(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// randomLabel returns 8 random letters: keys outlive a test in the shared token, and
// -count=N runs a test again in it.
func randomLabel() string { return strings.ToLower(rand.Text()[:8]) }

// FuzzDecodeStored: a state file, however damaged or edited, never panics the parser,
// and a nil error always comes with a key reference and a leaf whose serial the file
// names.
func FuzzDecodeStored(f *testing.F) {
	good, err := encodeStored(testca.New(f).SVID(f, hostA), "svid-ref")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte(`{"format":1,"spiffe_id":"spiffe://example.org/host/a","key":"k","chain":["MA=="]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		ref, certs, err := decodeStored(b, hostA)
		if err != nil {
			return
		}
		if ref == "" || len(certs) == 0 || certs[0] == nil {
			t.Fatalf("no error, but ref %q and %d certificates", ref, len(certs))
		}
	})
}
