package rotator

import (
	"context"
	"crypto"
	crand "crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/policy"
)

// Config configures a Rotator.
type Config struct {
	// ID is the identity to hold. Required.
	ID spiffeid.ID

	// Issuer obtains certificates. Required.
	Issuer Issuer

	// Bundle holds the trust anchors of ID's trust domain; answers from the CA must chain
	// to it and peers are verified against it. Required.
	Bundle *x509bundle.Bundle

	// Policy sets renewal timing, overlap, drain grace, the usage trigger and retry
	// bounds. Zero fields take the defaults documented in policy.RotationPolicy. SetPolicy
	// replaces it at run time.
	Policy policy.RotationPolicy

	// Keys makes the key of each new certificate (every rotation gets a fresh one) and
	// destroys it once the credential is retired. Default: MemoryKeys{}.
	Keys KeyStore

	// StateFile, when set, keeps the current SVID across restarts: its certificate chain
	// (public) and the reference of its key in Keys, which must then be PersistentKeys
	// (the key stays in the key store, never in the file). The file is replaced
	// atomically (mode 0600) after every rotation and removed when the SVID is revoked
	// or compromised. Run starts from it: a stored SVID that is still valid is presented
	// at once and renewed with itself (trigger "restart") instead of enrolling; an
	// expired one is retired and the identity enrols, which needs a bootstrap token the
	// CA has not seen. Empty (the default): nothing is kept and every start enrols.
	StateFile string

	// Drain closes the connections still authenticated by a retired credential. It is
	// called with the credential's serial when its overlap ends (grace
	// Policy.DrainGrace) or when it is revoked or compromised (grace 0), before its key
	// is destroyed, on a goroutine of its own: it must close, once grace has passed,
	// every connection authenticated by serial, return how many it closed, and return
	// early when ctx is done. Nil: nothing to drain; keys are destroyed at once.
	Drain func(ctx context.Context, serial string, grace time.Duration) int

	// Audit receives one record per rotation attempt and one per key state
	// transition. Nil means none.
	Audit Auditor

	// Registerer receives the rotator's metrics. Nil means they are not registered.
	Registerer prometheus.Registerer

	// OnRotate, when set, is called after each new SVID is published, on the
	// rotating goroutine: it must not block (the proxy recomputes its bundle in force,
	// which may drop an anchor no SVID chains to any more). Default nil.
	OnRotate func()

	// Logger receives rotation events. Nil discards them.
	Logger *slog.Logger

	// Rand is the jitter source, used only by Run's goroutine. Default: seeded from
	// crypto/rand.
	Rand *rand.Rand
}

func (c Config) withDefaults() Config {
	c.Policy = c.Policy.WithDefaults()
	if c.Keys == nil {
		c.Keys = MemoryKeys{}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Rand == nil {
		var seed [32]byte
		_, _ = crand.Read(seed[:])               // crypto/rand.Read never fails on supported platforms
		c.Rand = rand.New(rand.NewChaCha8(seed)) //nolint:gosec // G404: for jitter, which need not be secret; seeded from crypto/rand
	}
	return c
}

// credential is one SVID with everything derived from it. Its identity fields never
// change; a lifecycle transition publishes a copy with the new state, so a snapshot
// never changes under a reader. Copies share the handshake counter.
type credential struct {
	version    uint64 // 1, 2, ... per Rotator, in the order keys were made
	key        crypto.Signer
	svid       *x509svid.SVID
	cert       *tls.Certificate
	serial     string
	handshakes *atomic.Uint64 // handshakes signed with key, counted by cert's signer

	state        audit.KeyPhase // one of the State constants
	cause        Cause          // why it entered state
	since        time.Time      // when it entered state
	overlapUntil time.Time      // while in overlap: when the overlap ends
	endCause     Cause          // while in overlap: CauseOverlapEnd or CauseExpired
	retiring     bool           // its drain and destruction are scheduled
	drainBy      time.Time      // once retiring: when its last connection will have been closed
}

// newCredential wraps s. signed, when set, is called with the running count after each
// signature made with the key through cert (one per full TLS 1.3 handshake: a resumed
// one signs nothing).
func newCredential(s *x509svid.SVID, version uint64, signed func(n uint64)) *credential {
	chain := make([][]byte, len(s.Certificates))
	for i, c := range s.Certificates {
		chain[i] = c.Raw
	}
	n := new(atomic.Uint64)
	signer := &countingSigner{Signer: s.PrivateKey, n: n, signed: signed}
	return &credential{
		version:    version,
		key:        s.PrivateKey,
		svid:       s,
		cert:       &tls.Certificate{Certificate: chain, PrivateKey: signer, Leaf: s.Certificates[0]},
		serial:     s.Certificates[0].SerialNumber.String(),
		handshakes: n,
	}
}

// countingSigner counts the signatures made with a key, which is what the usage
// trigger limits: counting calls to TLSCertificate instead would also count resumed
// handshakes, failed ones and readers that only look.
type countingSigner struct {
	crypto.Signer
	n      *atomic.Uint64
	signed func(n uint64)
}

func (c *countingSigner) Sign(rand io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	sig, err := c.Signer.Sign(rand, digest, opts)
	if err == nil {
		n := c.n.Add(1)
		if c.signed != nil {
			c.signed(n)
		}
	}
	return sig, err
}

func (c *credential) notAfter() time.Time { return c.svid.Certificates[0].NotAfter }

func (c *credential) notBefore() time.Time { return c.svid.Certificates[0].NotBefore }

// to returns a copy of c in state, entered at now for cause.
func (c *credential) to(state audit.KeyPhase, cause Cause, now time.Time) *credential {
	n := *c
	n.state, n.cause, n.since = state, cause, now
	return &n
}

// snapshot is the immutable state that readers load; a rotation publishes a new one.
type snapshot struct {
	current *credential // nil before enrolment and after Revoke or a compromise dropped it
	// dropped is the current SVID that Revoke or a compromise took out of presentation
	// (state compromised, then destroyed); nil once a new one is obtained.
	dropped   *credential
	dropCause Cause         // CauseRevoked or CauseCompromise, while dropped is set
	overlap   []*credential // superseded SVIDs whose overlap has not ended, newest first
	retired   []*credential // retiring (draining) or recently destroyed, newest first
	bundle    *x509bundle.Bundle
	renewAt   time.Time
	lastErr   error // last failed attempt since the current SVID was obtained
	attempts  int   // failed attempts since then
	// needsToken: the last attempt was an enrolment the CA refused for good (its
	// bootstrap token used, expired or missing); only a new one can get an SVID once
	// the current one, if any, expires.
	needsToken bool
}

// Rotator holds one identity's credentials and keeps them fresh. Its read methods are
// safe for concurrent use and never block; Run must be called once.
type Rotator struct {
	cfg     Config
	policy  atomic.Pointer[policy.RotationPolicy] // defaults applied; replaced by SetPolicy
	state   atomic.Pointer[snapshot]
	metrics *metrics

	// wake interrupts Run's sleep: Revoke dropped the current SVID, the usage threshold
	// was reached, or the policy changed. Buffer of one, non-blocking send: signals
	// coalesce.
	wake          chan struct{}
	policyChanged atomic.Bool
	// calls carries Rotate requests to Run's goroutine, which makes every rotation.
	calls chan *rotateCall
	// retireWake tells Run's retiring goroutine that jobs are pending. Coalesced.
	retireWake chan struct{}
	// stopped is closed when Run returns.
	stopped chan struct{}

	// recordMu orders the key state records: a transition holds it from the moment it
	// reads the state until its record is written, so two transitions of one key (a
	// destruction and a revocation, say) are never recorded in the wrong order. Only
	// writers take it, never readers; it is taken before mu.
	recordMu sync.Mutex

	// mu serialises the writers of state (Run's publications, Revoke, transitions): each
	// builds the next snapshot from the one it loaded, and without the lock a
	// publication built from a snapshot loaded before a Revoke would bring the revoked
	// SVID back. Readers only Load and never take it.
	mu      sync.Mutex
	deny    denied // guarded by mu
	pending []job  // drains and destructions not started yet; guarded by mu

	version uint64 // last key version made; only Run's goroutine uses it

	persist PersistentKeys // Keys, when StateFile is set; else nil
	stored  string         // serial in StateFile ("": none); only Run's goroutine uses it
}

// Validate reports what New would refuse in c: a missing ID, Issuer or Bundle, a
// bundle of another trust domain, an invalid Policy (a *policy.FieldError), or a
// StateFile with keys that die with the process.
func (c Config) Validate() error {
	switch {
	case c.ID.IsZero():
		return errors.New("rotator: config: ID is required")
	case c.Issuer == nil:
		return errors.New("rotator: config: Issuer is required")
	case c.Bundle == nil || c.Bundle.Empty():
		return errors.New("rotator: config: Bundle with at least one authority is required")
	case c.Bundle.TrustDomain() != c.ID.TrustDomain():
		return errors.New("rotator: config: Bundle is not for the ID's trust domain")
	}
	if err := c.Policy.Validate(); err != nil {
		return err
	}
	if _, ok := c.Keys.(PersistentKeys); c.StateFile != "" && !ok {
		var keys KeyStore = MemoryKeys{} // the default
		if c.Keys != nil {
			keys = c.Keys
		}
		return fmt.Errorf("rotator: config: StateFile needs a key store whose keys outlive the process, not %T", keys)
	}
	return nil
}

// New validates cfg and returns a Rotator holding no SVID yet; Run obtains one.
func New(cfg Config) (*Rotator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	persist, _ := cfg.Keys.(PersistentKeys)
	if cfg.StateFile == "" {
		persist = nil
	}
	m, err := newMetrics(cfg.Registerer, cfg.ID)
	if err != nil {
		return nil, err
	}
	r := &Rotator{
		cfg:        cfg,
		metrics:    m,
		wake:       make(chan struct{}, 1),
		calls:      make(chan *rotateCall),
		retireWake: make(chan struct{}, 1),
		stopped:    make(chan struct{}),
		persist:    persist,
	}
	p := cfg.Policy
	r.policy.Store(&p)
	r.state.Store(&snapshot{bundle: cfg.Bundle})
	return r, nil
}

// ID returns the identity this Rotator holds.
func (r *Rotator) ID() spiffeid.ID { return r.cfg.ID }

// TLSCertificate returns the current SVID as a tls.Certificate for GetCertificate and
// GetClientCertificate. It returns ErrNoSVID, ErrExpired, ErrRevoked or ErrCompromised
// rather than a certificate that must not be used: an expired, revoked or compromised
// identity is never presented.
//
// Its private key counts every signature made with it (the usage trigger of
// Policy.MaxHandshakes), so readers may call TLSCertificate freely.
func (r *Rotator) TLSCertificate() (*tls.Certificate, error) {
	c, err := r.valid(time.Now())
	if err != nil {
		return nil, err
	}
	return c.cert, nil
}

// signedWith is called after each signature with the current key: at the threshold,
// exactly once per key, a non-blocking wake-up, so nothing on the handshake path waits
// for the loop.
func (r *Rotator) signedWith(n uint64) {
	if n == r.policy.Load().MaxHandshakes {
		r.signal()
	}
}

// signal wakes Run's loop; a pending wake-up already covers this one.
func (r *Rotator) signal() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// GetX509SVID implements x509svid.Source with the same rules as TLSCertificate, without
// counting a handshake.
func (r *Rotator) GetX509SVID() (*x509svid.SVID, error) {
	c, err := r.valid(time.Now())
	if err != nil {
		return nil, err
	}
	return c.svid, nil
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (r *Rotator) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return r.state.Load().bundle.GetX509BundleForTrustDomain(td)
}

// Ready returns nil while the identity has a valid SVID to present.
func (r *Rotator) Ready() error {
	_, err := r.valid(time.Now())
	return err
}

func (r *Rotator) valid(now time.Time) (*credential, error) {
	return r.state.Load().valid(now)
}

// valid returns the credential s may present at now, or why there is none.
func (s *snapshot) valid(now time.Time) (*credential, error) {
	c := s.current
	switch {
	case c == nil && s.dropped != nil && s.dropCause == CauseRevoked:
		return nil, ErrRevoked
	case c == nil && s.dropped != nil:
		return nil, ErrCompromised
	case c == nil:
		return nil, ErrNoSVID
	case expired(c.notAfter(), now):
		return nil, ErrExpired
	}
	return c, nil
}
