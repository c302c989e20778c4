package ca

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
)

const (
	defaultHeartbeat = 10 * time.Second
	// longPollWait is the wait the client asks the CA for; under the CA's 60s cap and
	// under common idle timeouts of load balancers in between.
	longPollWait = 25 * time.Second
	// maxRetryBase is the first retry delay (before jitter) after a failure; the
	// backoff doubles from there up to the heartbeat interval.
	maxRetryBase = 500 * time.Millisecond
	// minWatchInterval spaces long-polls that come back unchanged and early (a CA
	// shutting down answers at once), so such answers cannot make the client spin.
	minWatchInterval = time.Second
)

// DirectoryConfig configures a Directory, the mesh-directory client a proxy runs.
type DirectoryConfig struct {
	// URL is the https://host:port base URL of agentmesh ca. Required.
	URL string
	// Roots are the trust anchors for the CA's TLS serving certificate and for the
	// CA certificate that signs the deny-list (the CA's root). Required.
	Roots []*x509.Certificate
	// Certificate returns the proxy's current SVID (a /host/ ID of the CA's trust
	// domain, or any ID of it without Addresses; Leaf set or not, intermediates after
	// the leaf). Its trust domain is the one whose deny-list is followed. It is called
	// for every request (each request is a new TLS connection), so a rotation applies
	// at the next heartbeat or poll. An error fails that request, which is retried.
	// Required.
	Certificate func() (*tls.Certificate, error)
	// Addresses are the IP addresses this host is reached at, advertised to peers
	// (at most 32). IPv4-mapped IPv6 addresses are unmapped; zoned, unspecified and
	// multicast ones are refused. Default none: the Directory only watches, so a
	// proxy that routes by static configuration still follows the directory and the
	// deny-list; it never registers (TunnelPort, Transports and BundleVersion are
	// then unused).
	Addresses []netip.Addr
	// TunnelPort is the port of this proxy's tunnel listener. Required (1-65535)
	// with Addresses.
	TunnelPort uint16
	// Transports are the tunnel transports this proxy accepts, most preferred first.
	// Default ["tls"].
	Transports []string
	// BundleVersion, when set, returns the version of the trust bundle the proxy holds;
	// it is reported with each heartbeat. Default nil: not reported.
	BundleVersion func() string
	// Heartbeat is the interval between registrations (minus up to a tenth of jitter,
	// so that proxies started together spread out), and the cap of the retry backoff.
	// Keep it well under the CA's DirectoryTTL (30s by default). Default 10s.
	Heartbeat time.Duration
	// Control, when set, is called on every socket dialed to the CA before it
	// connects; the proxy sets its SO_MARK there so capture rules skip this traffic.
	// Default nil.
	Control func(network, address string, c syscall.RawConn) error
	// OnDenyList is called with every deny-list newly accepted from the CA (signed
	// by a CA certificate chaining to Roots, for the trust domain of Certificate, and
	// newer than the one held), in version order, never concurrently, from one of
	// Run's goroutines; the next list waits until it returns. It returns how many
	// live connections it closed, for the audit record. Default nil: the list is
	// only held (DenyList).
	OnDenyList func(*DenyList) (closed int)
	// PollInterval is the period (minus up to a tenth of jitter) of the fallback
	// poll of the deny-list, besides the directory watch that delivers new lists at
	// once. It bounds how stale the list gets while the watch is stuck, and two
	// failed polls in a row report the feed unreachable. Default 5s.
	PollInterval time.Duration
	// OnFleetRotation is called with a fleet rotation announced in the directory (an
	// operator ran `agentmesh rotate --all`) whose ID is above every one this
	// Directory has seen and which was requested (FleetRotation.At, the CA's clock)
	// after this Directory was created: a proxy started after the request already has
	// a newer credential. Each ID at most once, from Run's watch goroutine, which
	// waits until it returns: start the rotation and return. A CA clock ahead of or
	// behind this host's by more than the time between start and request can make a
	// proxy started around a request rotate once more, or not. Default nil: logged
	// only.
	OnFleetRotation func(FleetRotation)
	// OnEntries is called with the registration entries (sorted by ID; the caller
	// owns the slice) after the first directory version is applied, and after every
	// later one whose entries differ from the previous one's. From Run's watch
	// goroutine, never concurrently, which waits until it returns. Default nil: the
	// entries are only held (Entries, AgentsAt).
	OnEntries func([]Entry)
	// Audit receives an audit.DenyList record for every deny-list applied or
	// refused (the same refused list arriving again in a row is recorded once).
	// Default nil: none.
	Audit interface{ Append(audit.Event) error }
	// Registerer receives the revocation feed's metrics
	// (agentmesh_revocation_*). Default nil: not registered.
	Registerer prometheus.Registerer
	// Logger receives retries at Warn, (re-)registrations, applied deny-lists and
	// fleet rotations at Info, refused deny-lists and an unreachable revocation feed at Error, and
	// applied directory versions at Debug. Default: discard.
	Logger *slog.Logger
}

func (c DirectoryConfig) withDefaults() DirectoryConfig {
	if len(c.Transports) == 0 {
		c.Transports = []string{"tls"}
	}
	if c.Heartbeat == 0 {
		c.Heartbeat = defaultHeartbeat
	}
	if c.PollInterval == 0 {
		c.PollInterval = defaultPollInterval
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// peerRoute is what PeerFor answers for one address, precomputed so that a lookup
// allocates nothing.
type peerRoute struct {
	id         spiffeid.ID
	tunnel     string   // host:port
	transports []string // what the peer accepts, most preferred first; shared, read-only
}

// dirSnapshot is one applied directory version. Immutable once published.
type dirSnapshot struct {
	version uint64
	peers   map[netip.Addr]peerRoute
	entries []Entry // sorted by ID
	// agents are the agents registered with a port, by port, to the host of the proxy
	// advertising each address (this proxy's own included); the inner maps are shared
	// by every address of a host. Precomputed so that AgentsAt allocates nothing.
	agents map[netip.Addr]map[uint16]spiffeid.ID
}

// Directory keeps this proxy registered in the mesh directory of agentmesh ca
// (heartbeats), a local copy of the directory up to date (long-poll watch), and the
// CA's signed revocation deny-list (in every directory answer, and polled). It
// answers which proxy lives at an address, which agents are registered where, which
// deny-list is in force and whether it is fresh. PeerFor, TransportsFor, Entries,
// AgentsAt, Version, Updated, DenyList, Confirmed and CheckFresh are safe for
// concurrent use and never block on the network; before the first directory arrives
// PeerFor knows no peer. Since the copy is kept while the CA is unreachable, peers
// that vanished meanwhile stay listed; the tunnel's peer verification still applies.
// AgentToken asks the CA, and is safe for concurrent use too.
type Directory struct {
	cfg  DirectoryConfig
	base string
	log  *slog.Logger
	hc   *http.Client
	tr   *http.Transport
	body registerRequest // addresses, port and transports; the bundle version is per request

	self    atomic.Pointer[spiffeid.ID] // ID of the certificate last presented
	snap    atomic.Pointer[dirSnapshot]
	applyMu sync.Mutex // serialises apply's check-then-store
	updated chan struct{}
	running atomic.Bool

	deny        atomic.Pointer[DenyList]
	confirmed   atomic.Pointer[time.Time]
	denyMu      sync.Mutex        // serialises offerDenyList's check-then-store and OnDenyList
	lastRefused [sha256.Size]byte // guarded by denyMu: key of the last list refused
	feedMu      sync.Mutex
	health      feedHealth // guarded by feedMu
	metrics     *feedMetrics

	created   time.Time // fleet rotations requested before it are not this proxy's
	fleetMu   sync.Mutex
	fleetSeen uint64 // guarded by fleetMu: the highest fleet rotation ID seen
}

// NewDirectory checks cfg and returns a Directory. It does not contact the CA and
// starts no goroutine: call Run.
func NewDirectory(cfg DirectoryConfig) (*Directory, error) {
	cfg = cfg.withDefaults()
	base, pool, err := endpoint(cfg.URL, cfg.Roots)
	switch {
	case err != nil:
		return nil, err
	case cfg.Certificate == nil:
		return nil, fmt.Errorf("%w: Certificate is required", ErrInvalidConfig)
	case len(cfg.Addresses) > maxAddresses:
		return nil, fmt.Errorf("%w: Addresses: at most %d", ErrInvalidConfig, maxAddresses)
	case len(cfg.Addresses) > 0 && cfg.TunnelPort == 0:
		return nil, fmt.Errorf("%w: TunnelPort is required with Addresses", ErrInvalidConfig)
	case cfg.Heartbeat < 0:
		return nil, fmt.Errorf("%w: negative Heartbeat", ErrInvalidConfig)
	case cfg.PollInterval < 0:
		return nil, fmt.Errorf("%w: negative PollInterval", ErrInvalidConfig)
	}
	metrics, err := newFeedMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	body := registerRequest{TunnelPort: int(cfg.TunnelPort)}
	addrs := make([]netip.Addr, 0, len(cfg.Addresses))
	for _, a := range cfg.Addresses {
		if !a.IsValid() {
			return nil, fmt.Errorf("%w: Addresses: invalid address", ErrInvalidConfig)
		}
		if err := checkAdvertisable(a); err != nil {
			return nil, fmt.Errorf("%w: Addresses: %w", ErrInvalidConfig, err)
		}
		addrs = append(addrs, a.Unmap())
	}
	slices.SortFunc(addrs, netip.Addr.Compare)
	for _, a := range slices.Compact(addrs) {
		body.Addresses = append(body.Addresses, a.String())
	}
	if body.Transports, err = normaliseTransports(cfg.Transports); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	cfg.Addresses = slices.Clone(cfg.Addresses)
	cfg.Roots = slices.Clone(cfg.Roots)

	d := &Directory{
		cfg:     cfg,
		base:    base,
		log:     cfg.Logger,
		body:    body,
		updated: make(chan struct{}, 1),
		metrics: metrics,
	}
	d.snap.Store(&dirSnapshot{})
	// A new proxy gets one staleness window to reach the CA.
	created := time.Now()
	d.created = created
	d.confirmed.Store(&created)
	metrics.confirmed.Set(float64(created.UnixNano()) / 1e9)
	d.tr = &http.Transport{
		// Never through HTTP(S)_PROXY: on a meshed host that is the agentmesh proxy.
		Proxy:       nil,
		DialContext: (&net.Dialer{Timeout: defaultClientTimeout, Control: cfg.Control}).DialContext,
		TLSClientConfig: &tls.Config{
			MinVersion:           tls.VersionTLS13,
			RootCAs:              pool,
			GetClientCertificate: d.clientCertificate,
		},
		// A new connection, hence a fresh call to Certificate, for every request: a
		// rotated SVID is presented at the next heartbeat, and the CA never sees a
		// connection outlive the certificate that opened it. At one heartbeat and
		// one long-poll per interval, the handshakes cost little.
		DisableKeepAlives:   true,
		TLSHandshakeTimeout: defaultClientTimeout,
	}
	d.hc = &http.Client{Transport: d.tr}
	return d, nil
}

// clientCertificate presents the current SVID and remembers its ID, which is how the
// Directory knows its own entry.
func (d *Directory) clientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	c, err := d.cfg.Certificate()
	if err != nil {
		return nil, fmt.Errorf("current svid: %w", err)
	}
	id, err := certificateID(c)
	if err != nil {
		return nil, err
	}
	d.self.Store(&id)
	return c, nil
}

// PeerFor returns the SPIFFE ID of the proxy at addr and the host:port of its tunnel
// listener, or ok false when no other proxy is registered there (this proxy's own
// addresses included). It reads an immutable snapshot without locking.
func (d *Directory) PeerFor(addr netip.Addr) (id spiffeid.ID, tunnel string, ok bool) {
	r, ok := d.snap.Load().peers[addr.Unmap()]
	return r.id, r.tunnel, ok
}

// TransportsFor returns the tunnel transports the proxy at addr accepts, most preferred
// first (nil when no proxy is registered there). The slice is shared: do not modify it.
func (d *Directory) TransportsFor(addr netip.Addr) []string {
	return d.snap.Load().peers[addr.Unmap()].transports
}

// Version is the version of the directory held, 0 before the first one arrives.
func (d *Directory) Version() uint64 { return d.snap.Load().version }

// Updated returns a channel that receives after a new directory version has been
// applied. Notifications coalesce (buffer of one): after a receive, read the state
// again rather than count.
func (d *Directory) Updated() <-chan struct{} { return d.updated }

// Run registers at once, then heartbeats every DirectoryConfig.Heartbeat (unless
// there are no Addresses), watches the directory with long-polls, and polls the
// deny-list every DirectoryConfig.PollInterval, until ctx is done. Failures (CA
// unreachable, refusal, bad answer) are logged at Warn and retried, the registration
// and the watch with capped exponential backoff and full jitter; they never end Run.
// It returns nil once ctx is done and its loops have exited, or ErrDirectoryRunning if
// Run is already running.
func (d *Directory) Run(ctx context.Context) error {
	if !d.running.CompareAndSwap(false, true) {
		return ErrDirectoryRunning
	}
	defer d.running.Store(false)
	defer d.tr.CloseIdleConnections()
	var wg sync.WaitGroup
	if len(d.body.Addresses) > 0 {
		wg.Go(func() { d.heartbeatLoop(ctx) })
	}
	wg.Go(func() { d.watchLoop(ctx) })
	wg.Go(func() { d.pollLoop(ctx) })
	wg.Wait()
	return nil
}

func (d *Directory) heartbeatLoop(ctx context.Context) {
	failures, registered := 0, false
	for {
		version, err := d.register(ctx)
		var wait time.Duration
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			failures++
			wait = d.retryAfter("directory registration failed", failures, err)
		default:
			if failures > 0 || !registered {
				d.log.Info("registered in the mesh directory", keyAddresses, d.body.Addresses,
					keyTunnelPort, d.cfg.TunnelPort, keyVersion, version)
			}
			failures, registered = 0, true
			wait = heartbeatDelay(d.cfg.Heartbeat, rand.Float64())
		}
		if !sleep(ctx, wait) {
			return
		}
	}
}

func (d *Directory) watchLoop(ctx context.Context) {
	failures := 0
	for {
		start := time.Now()
		held := d.Version()
		snap, err := d.fetch(ctx, held)
		var changed bool
		if err == nil {
			changed, err = d.apply(snap)
		}
		var wait time.Duration
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			failures++
			wait = d.retryAfter("directory watch failed", failures, err)
		default:
			failures = 0
			if !changed {
				wait = minWatchInterval - time.Since(start)
			}
		}
		if wait > 0 && !sleep(ctx, wait) {
			return
		}
	}
}

// retryAfter logs a failed attempt of a loop and returns how long it waits before
// the next one: capped backoff with jitter, never longer than a heartbeat.
func (d *Directory) retryAfter(msg string, failures int, err error) time.Duration {
	wait := retryDelay(failures, d.retryBase(), d.cfg.Heartbeat, rand.Float64())
	d.log.Warn(msg, keyErr, err, keyAttempt, failures, keyRetryIn, wait)
	return wait
}

func (d *Directory) retryBase() time.Duration { return min(maxRetryBase, d.cfg.Heartbeat) }

// register sends one registration (a heartbeat) and returns the directory version
// after it.
func (d *Directory) register(ctx context.Context) (uint64, error) {
	body := d.body
	if d.cfg.BundleVersion != nil {
		body.BundleVersion = d.cfg.BundleVersion()
	}
	b, err := json.Marshal(body)
	if err != nil {
		return 0, fmt.Errorf("ca: register: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, defaultClientTimeout)
	defer cancel()
	answer, err := d.do(ctx, "register", http.MethodPost, d.base+meshPrefix+meshRegisterPath, b, maxRegisterBody)
	if err != nil {
		return 0, err
	}
	var resp registerResponse
	if err := json.Unmarshal(answer, &resp); err != nil {
		return 0, fmt.Errorf("ca: register: malformed answer: %w", err)
	}
	return resp.Version, nil
}

// fetch long-polls the directory for a version other than held. The deny-list in
// the answer is offered first, and on its own: a refused list does not stop the
// directory from being applied, nor does a malformed directory stop a valid list.
func (d *Directory) fetch(ctx context.Context, held uint64) (*dirSnapshot, error) {
	ctx, cancel := context.WithTimeout(ctx, longPollWait+watchGrace)
	defer cancel()
	u := d.base + meshPrefix + meshDirectoryPath + "?since=" + strconv.FormatUint(held, 10) +
		"&wait=" + longPollWait.String()
	answer, err := d.do(ctx, "directory", http.MethodGet, u, nil, maxDirectoryResponse)
	if err != nil {
		return nil, err
	}
	doc, err := parseDirectory(answer)
	if err != nil {
		return nil, fmt.Errorf("ca: directory: %w", err)
	}
	if doc.Revocations != nil {
		// Refusals are logged and audited there; the poll reports an outage.
		_ = d.offerDenyList(feedSourceDirectory, doc.Revocations)
	}
	if doc.Rotation != nil {
		// On its own too: an older answer's rotation is not new (fleetDue), and the
		// peers of a malformed directory do not hold it up.
		d.offerFleetRotation(*doc.Rotation)
	}
	var self spiffeid.ID
	if p := d.self.Load(); p != nil {
		self = *p
	}
	snap, err := directoryRoutes(doc, self)
	if err != nil {
		return nil, fmt.Errorf("ca: directory: %w", err)
	}
	return snap, nil
}

// do sends one request and returns the body of a 200 answer, at most limit bytes. Any
// other status is a *ResponseError.
func (d *Directory) do(ctx context.Context, op, method, u string, body []byte, limit int64) ([]byte, error) {
	var req *http.Request
	var err error
	if body != nil {
		req, err = http.NewRequestWithContext(ctx, method, u, bytes.NewReader(body))
	} else {
		req, err = http.NewRequestWithContext(ctx, method, u, nil)
	}
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", op, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := d.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", op, err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := readLimited(resp.Body, limit)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: read answer: %w", op, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, &ResponseError{Op: op, Status: resp.StatusCode, Message: stepErrorMessage(b)}
	}
	return b, nil
}

// apply publishes snap if it is newer than the directory held. The same version is
// not a change; an older one is refused (ErrDirectoryRollback): a stale or replayed
// answer must never bring back peers that were removed.
func (d *Directory) apply(snap *dirSnapshot) (bool, error) {
	d.applyMu.Lock()
	cur := d.snap.Load()
	switch {
	case snap.version == cur.version:
		d.applyMu.Unlock()
		return false, nil
	case snap.version < cur.version:
		d.applyMu.Unlock()
		return false, fmt.Errorf("%w: got version %d, hold %d", ErrDirectoryRollback, snap.version, cur.version)
	}
	d.snap.Store(snap)
	d.applyMu.Unlock()
	// Before the notification, so that whoever wakes on Updated sees what OnEntries
	// did. cur.version 0 is the empty snapshot held before the first directory.
	if d.cfg.OnEntries != nil && (cur.version == 0 || !slices.Equal(cur.entries, snap.entries)) {
		d.cfg.OnEntries(slices.Clone(snap.entries))
	}
	select {
	case d.updated <- struct{}{}:
	default:
	}
	d.log.Debug("directory version applied", keyVersion, snap.version, keyHeld, cur.version, keyPeers, len(snap.peers))
	return true, nil
}

// decodeDirectory parses a directory document into the snapshot PeerFor reads,
// leaving out self's entry (see directoryRoutes).
func decodeDirectory(b []byte, self spiffeid.ID) (*dirSnapshot, error) {
	doc, err := parseDirectory(b)
	if err != nil {
		return nil, err
	}
	return directoryRoutes(doc, self)
}

// parseDirectory decodes a directory document. Fields it does not know (sections of
// newer CAs) are ignored.
func parseDirectory(b []byte) (*DirectoryDocument, error) {
	var doc DirectoryDocument
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("malformed directory: %w", err)
	}
	return &doc, nil
}

// directoryRoutes builds the snapshot PeerFor reads from doc, leaving out self's
// entry. A document with a malformed entry is refused whole (the directory held
// stays): the CA validates every entry, so one that is not is a fault, and a partial
// directory would silently misroute.
func directoryRoutes(doc *DirectoryDocument, self spiffeid.ID) (*dirSnapshot, error) {
	if doc.Version == 0 {
		return nil, errors.New("malformed directory: no version")
	}
	snap := &dirSnapshot{version: doc.Version, peers: make(map[netip.Addr]peerRoute)}
	for i, p := range doc.Peers {
		switch {
		case p.SPIFFEID.IsZero():
			return nil, fmt.Errorf("malformed directory: peer %d has no spiffe_id", i)
		case p.TunnelPort == 0:
			return nil, fmt.Errorf("malformed directory: peer %s has no tunnel_port", p.SPIFFEID)
		case len(p.Addresses) == 0:
			return nil, fmt.Errorf("malformed directory: peer %s has no addresses", p.SPIFFEID)
		}
		if p.SPIFFEID == self {
			continue
		}
		port := strconv.Itoa(int(p.TunnelPort))
		for _, a := range p.Addresses {
			if !a.IsValid() || checkAdvertisable(a) != nil {
				return nil, fmt.Errorf("malformed directory: peer %s has an invalid address %q", p.SPIFFEID, a)
			}
			a = a.Unmap()
			if other, dup := snap.peers[a]; dup {
				return nil, fmt.Errorf("malformed directory: address %s listed for %s and %s", a, other.id, p.SPIFFEID)
			}
			snap.peers[a] = peerRoute{id: p.SPIFFEID, tunnel: net.JoinHostPort(a.String(), port), transports: p.Transports}
		}
	}
	if err := snap.addEntries(doc); err != nil {
		return nil, err
	}
	return snap, nil
}

// retryDelay is the wait before retry number attempt (from 1): exponential from base,
// capped at maxDelay, with full jitter (r uniform in [0, 1)).
func retryDelay(attempt int, base, maxDelay time.Duration, r float64) time.Duration {
	d := maxDelay
	if attempt < 1 {
		attempt = 1
	}
	if shift := attempt - 1; shift < 32 {
		if b := base << shift; b > 0 && b < maxDelay {
			d = b
		}
	}
	return time.Duration(r * float64(d))
}

// heartbeatDelay is the wait before the next heartbeat: the interval minus up to a
// tenth of it (r uniform in [0, 1)), never more than the interval, so that proxies
// started together spread out and the TTL margin is kept.
func heartbeatDelay(interval time.Duration, r float64) time.Duration {
	return interval - time.Duration(r*float64(interval)/10)
}

// sleep waits for d or until ctx is done; it reports whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
