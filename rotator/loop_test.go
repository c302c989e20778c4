package rotator

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"math/big"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/policy"
)

var hostA = spiffeid.RequireFromString("spiffe://example.org/host/a")

// issuer signs with an in-memory CA and lets a test make any call fail or answer wrongly.
// Only the rotator's loop is under test here; the real CA is exercised in ca and e2e.
type issuer struct {
	t        testing.TB
	ca       *testca.CA
	lifetime time.Duration

	mu      sync.Mutex
	fail    error              // returned by every call while set
	answer  func() spiffeid.ID // the identity put in certificates; default: the one asked for
	serial  *big.Int           // the serial put in certificates; default: a random one
	gate    chan struct{}      // while set, every call (already counted) waits for it to close
	enrolls int
	renews  int
}

func (i *issuer) Enroll(_ context.Context, id spiffeid.ID, key crypto.Signer) ([]*x509.Certificate, error) {
	i.count(&i.enrolls)
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.issue(id, key)
}

func (i *issuer) Renew(_ context.Context, cur *x509svid.SVID, key crypto.Signer) ([]*x509.Certificate, error) {
	i.count(&i.renews)
	i.mu.Lock()
	defer i.mu.Unlock()
	if time.Now().After(cur.Certificates[0].NotAfter) {
		return nil, permanentErr{}
	}
	return i.issue(cur.ID, key)
}

// count counts a call, then holds it at the gate if one is set, so a test can act while
// a call is in flight.
func (i *issuer) count(n *int) {
	i.mu.Lock()
	*n++
	gate := i.gate
	i.mu.Unlock()
	if gate != nil {
		<-gate
	}
}

func (i *issuer) issue(id spiffeid.ID, key crypto.Signer) ([]*x509.Certificate, error) {
	if i.fail != nil {
		return nil, i.fail
	}
	if i.answer != nil {
		id = i.answer()
	}
	opts := []testca.IssueOption{testca.WithLifetime(i.lifetime)}
	if i.serial != nil {
		opts = append(opts, testca.WithSerial(i.serial))
	}
	return i.ca.Issue(i.t, id, key.Public(), opts...), nil
}

func (i *issuer) set(f func(*issuer)) {
	i.mu.Lock()
	defer i.mu.Unlock()
	f(i)
}

func (i *issuer) counts() (enrolls, renews int) {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.enrolls, i.renews
}

type permanentErr struct{}

func (permanentErr) Error() string   { return "certificate expired" }
func (permanentErr) Permanent() bool { return true }

// records keeps the audit records a rotator appends.
type records struct {
	mu   sync.Mutex
	list []*audit.Rotation
	keys []*audit.KeyState
}

func (r *records) Append(e audit.Event) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch e := e.(type) {
	case *audit.Rotation:
		r.list = append(r.list, e)
	case *audit.KeyState:
		r.keys = append(r.keys, e)
	}
	return nil
}

// keyStates returns the key_state records of one key version, in order.
func (r *records) keyStates(version uint64) []*audit.KeyState {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*audit.KeyState
	for _, k := range r.keys {
		if k.Version == version {
			out = append(out, k)
		}
	}
	return out
}

func (r *records) all() []*audit.Rotation {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*audit.Rotation(nil), r.list...)
}

// start runs a rotator in the current synctest bubble until the test ends.
func start(t *testing.T, iss *issuer, p policy.RotationPolicy) (*Rotator, *records) {
	t.Helper()
	return startWith(t, iss, Config{Policy: p})
}

// startWith is start with more of the Config; ID, Issuer, Bundle and Audit are set here.
func startWith(t *testing.T, iss *issuer, cfg Config) (*Rotator, *records) {
	t.Helper()
	r, rec, _ := run(t, iss, cfg)
	synctest.Wait()
	return r, rec
}

// run starts a Rotator for hostA with cfg (ID, Issuer, Bundle and Audit set here) and
// returns it with its audit records and a stop function that ends Run and waits for
// it, as a process exit would (the test's cleanup calls it too).
func run(t *testing.T, iss *issuer, cfg Config) (*Rotator, *records, func()) {
	t.Helper()
	rec := &records{}
	cfg.ID, cfg.Issuer, cfg.Bundle, cfg.Audit = hostA, iss, iss.ca.Bundle(), rec
	r, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	stop := sync.OnceFunc(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	t.Cleanup(stop)
	return r, rec, stop
}

// advance moves the bubble's clock by d and lets every goroutine settle.
func advance(d time.Duration) {
	<-time.After(d)
	synctest.Wait()
}

func newIssuer(t *testing.T, lifetime time.Duration) *issuer {
	return &issuer{t: t, ca: testca.New(t), lifetime: lifetime}
}

func TestRunRenewsOncePerWindow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Minute)
		r, rec := start(t, iss, policy.RotationPolicy{})
		if err := r.Ready(); err != nil {
			t.Fatalf("not ready after enrolment: %v", err)
		}
		// Ten lifetimes: renewal comes every 37-40 s, so 15 or 16 renewals.
		for range 600 {
			advance(time.Second)
			if err := r.Ready(); err != nil {
				t.Fatalf("not ready at %v: %v", time.Now(), err)
			}
		}
		enrolls, renews := iss.counts()
		if enrolls != 1 || renews < 15 || renews > 16 {
			t.Fatalf("enrolls=%d renews=%d, want 1 and 15-16", enrolls, renews)
		}
		all := rec.all()
		if len(all) != enrolls+renews {
			t.Fatalf("%d audit records for %d rotations", len(all), enrolls+renews)
		}
		for i, a := range all[1:] {
			prev := all[i]
			if a.Trigger != string(TriggerTime) || a.Result != "ok" || a.OldSerial != prev.NewSerial {
				t.Fatalf("record %d = %+v after %+v", i+1, a, prev)
			}
			// Each renewal happened inside its window: [NotAfter-L/3-L/20, NotAfter-L/3].
			gap := prev.NotAfter.Sub(a.Started)
			if gap < 20*time.Second || gap > 23*time.Second {
				t.Fatalf("renewal %d started %v before expiry, want 20s-23s", i+1, gap)
			}
		}
	})
}

func TestRunBacksOffThenRecovers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Minute)
		p := policy.RotationPolicy{RetryMin: time.Second, RetryMax: 4 * time.Second}
		r, _ := start(t, iss, p)
		first := r.Status().Current.Serial
		iss.set(func(i *issuer) { i.fail = errors.New("ca unavailable") })
		advance(45 * time.Second) // past the renewal time, still valid
		if err := r.Ready(); err != nil {
			t.Fatalf("valid SVID not ready: %v", err)
		}
		_, renews := iss.counts()
		// 5-8 s of retries after renewal at 37-40 s: at least one retry per 4 s cap.
		if renews < 2 {
			t.Fatalf("renews = %d, want retries", renews)
		}
		if got := r.Status(); got.Current.Serial != first || got.Attempts != renews {
			t.Fatalf("status = %+v, want serial %s kept and %d attempts", got, first, renews)
		}
		iss.set(func(i *issuer) { i.fail = nil })
		advance(5 * time.Second)
		if st := r.Status(); st.Current.Serial == first || st.Attempts != 0 || len(st.Overlap) != 1 {
			t.Fatalf("after recovery status = %+v, want a new serial and the old one in overlap", st)
		}
	})
}

func TestRunNeverPresentsExpired(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Minute)
		r, rec := start(t, iss, policy.RotationPolicy{RetryMin: time.Second, RetryMax: 10 * time.Second})
		iss.set(func(i *issuer) { i.fail = errors.New("ca unavailable") })
		advance(61 * time.Second)
		if _, err := r.TLSCertificate(); !errors.Is(err, ErrExpired) {
			t.Fatalf("TLSCertificate after expiry: err = %v, want ErrExpired", err)
		}
		if err := r.Ready(); !errors.Is(err, ErrExpired) {
			t.Fatalf("Ready after expiry = %v, want ErrExpired", err)
		}
		_, renewsAtExpiry := iss.counts()
		iss.set(func(i *issuer) { i.fail = nil })
		advance(11 * time.Second)
		if err := r.Ready(); err != nil {
			t.Fatalf("not ready after the CA came back: %v", err)
		}
		// An expired certificate cannot be renewed: only enrolment is tried after expiry.
		if _, renews := iss.counts(); renews != renewsAtExpiry {
			t.Fatalf("%d renewals attempted after expiry", renews-renewsAtExpiry)
		}
		last := rec.all()[len(rec.all())-1]
		if last.Trigger != string(TriggerExpired) || last.Result != "ok" {
			t.Fatalf("last record = %+v, want a successful re-enrolment", last)
		}
		if enrolls, _ := iss.counts(); enrolls < 2 {
			t.Fatalf("enrolls = %d, want a re-enrolment", enrolls)
		}
	})
}

func TestRunRefusesBadAnswer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Minute)
		r, rec := start(t, iss, policy.RotationPolicy{RetryMin: time.Second, RetryMax: 2 * time.Second})
		first := r.Status().Current.Serial
		iss.set(func(i *issuer) {
			i.answer = func() spiffeid.ID { return spiffeid.RequireFromString("spiffe://example.org/host/evil") }
		})
		advance(45 * time.Second)
		if st := r.Status(); st.Current.Serial != first || st.Attempts == 0 {
			t.Fatalf("status = %+v, want the first SVID kept after refused answers", st)
		}
		var refused int
		for _, a := range rec.all() {
			if a.Result == "error" {
				refused++
			}
		}
		if refused == 0 {
			t.Fatal("no audit record for the refused answer")
		}
	})
}

func TestRunOverlapEnds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Minute)
		r, _ := start(t, iss, policy.RotationPolicy{Overlap: 5 * time.Second, JitterFraction: 0.0001})
		advance(41 * time.Second) // renewed at ~40 s
		st := r.Status()
		if len(st.Overlap) != 1 {
			t.Fatalf("overlap = %+v, want the superseded SVID", st.Overlap)
		}
		if until := st.Overlap[0].OverlapUntil; time.Until(until) > 5*time.Second || time.Until(until) <= 0 {
			t.Fatalf("overlap until %v, want within 5 s", until)
		}
		advance(5 * time.Second)
		if st := r.Status(); len(st.Overlap) != 0 {
			t.Fatalf("overlap after it ended = %+v", st.Overlap)
		}
	})
}
