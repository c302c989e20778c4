package meshclient

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agentmesh/agentmesh/internal/metricreg"
	"github.com/agentmesh/agentmesh/meshapi"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/audit"
)

// The revocation feed is the Watch's copy of the CA's signed deny-list. It arrives
// two ways: in every directory answer (the long-poll wakes as soon as the CA publishes
// a new version) and from a poll of GET /mesh/v1/revocations every PollInterval, which
// keeps the copy fresh when the watch is stuck. Both go through denyFeed.offer.

const (
	defaultPollInterval = 5 * time.Second
	// feedDownAfter is how many consecutive polls must fail, with no verified list
	// from the watch in between, before the feed is reported unreachable: a single
	// failed poll is a blip.
	feedDownAfter = 2
	// Where a list came from, for the log.
	feedSourceDirectory = "directory"
	feedSourcePoll      = "poll"
)

// The result and refusal reasons of audit.DenyList records of refused lists (also
// the reason label of the refused-lists metric).
const (
	denyResultRefused      = "refused"
	denyReasonBadSignature = "bad_signature"
	denyReasonStale        = "stale_version"
	denyReasonConflict     = "conflict"
	denyReasonGap          = "gap"
	denyReasonPremature    = "premature_expiry"
	denyReasonMalformed    = "malformed"
)

// Metric names and labels of the revocation feed.
const (
	metricDenyListVersion   = "agentmesh_revocation_list_version"
	metricDenyListConfirmed = "agentmesh_revocation_list_confirmed_timestamp_seconds"
	metricDenyListLag       = "agentmesh_revocation_list_apply_lag_seconds"
	metricDenyListRefused   = "agentmesh_revocation_lists_refused_total"
	metricFeedUp            = "agentmesh_revocation_feed_up"
	labelReason             = "reason"
)

// Log attribute keys of the revocation feed, besides those in names.go.
const (
	keyFeedLag    = "lag"
	keyFeedSource = "source"
	keyFeedAge    = "age"
)

// feedMetrics always exist so the feed never checks for nil; they are registered only
// when Config.Registerer is set.
type feedMetrics struct {
	version   prometheus.Gauge
	confirmed prometheus.Gauge
	lag       prometheus.Histogram
	refused   *prometheus.CounterVec
	up        prometheus.Gauge
}

func newFeedMetrics(reg prometheus.Registerer) (*feedMetrics, error) {
	m := &feedMetrics{
		version: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricDenyListVersion,
			Help: "Version of the revocation deny-list in force (0: none yet).",
		}),
		confirmed: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricDenyListConfirmed,
			Help: "When the deny-list in force was last confirmed current with the CA, as a Unix timestamp; time() minus it is the feed's staleness.",
		}),
		lag: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: metricDenyListLag,
			Help: "Time from the CA signing a deny-list to this proxy enforcing it.",
			// 1ms (the CA next door, long-poll woken) to 10s (two missed polls).
			Buckets: []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10},
		}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricDenyListRefused,
			Help: "Deny-lists received and refused, by reason.",
		}, []string{labelReason}),
		up: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricFeedUp,
			Help: "1 while the revocation feed delivers verified deny-lists, 0 before the first one and after two consecutive failed polls.",
		}),
	}
	// Pre-create the series so dashboards see zeros instead of gaps.
	for _, r := range []string{denyReasonBadSignature, denyReasonStale, denyReasonConflict, denyReasonGap, denyReasonPremature, denyReasonMalformed} {
		m.refused.WithLabelValues(r)
	}
	if err := metricreg.Register(reg, m.version, m.confirmed, m.lag, m.refused, m.up); err != nil {
		return nil, err
	}
	return m, nil
}

// feedHealth counts failed polls to tell a blip from an outage. Guarded by
// denyFeed.feedMu.
type feedHealth struct {
	failures int  // consecutive failed polls since the last verified list
	down     bool // the outage has been reported
}

// failed is h after a failed poll; alert reports that the outage is to be reported
// now (once per outage).
func (h feedHealth) failed() (next feedHealth, alert bool) {
	h.failures++
	if h.failures >= feedDownAfter && !h.down {
		h.down = true
		return h, true
	}
	return h, false
}

// succeeded is h after a verified list from either path; recovered reports that an
// outage had been reported and is over.
func (h feedHealth) succeeded() (next feedHealth, recovered bool) {
	return feedHealth{}, h.down
}

// denyListRefusal classifies why a received list was refused, for the audit record and
// the metric.
func denyListRefusal(err error) string {
	switch {
	case errors.Is(err, meshapi.ErrDenyListSignature):
		return denyReasonBadSignature
	case errors.Is(err, meshapi.ErrDenyListStale):
		return denyReasonStale
	case errors.Is(err, meshapi.ErrDenyListConflict):
		return denyReasonConflict
	case errors.Is(err, meshapi.ErrDenyListGap):
		return denyReasonGap
	case errors.Is(err, meshapi.ErrDenyListPremature):
		return denyReasonPremature
	default:
		return denyReasonMalformed
	}
}

// refusedList reports whether err is the refusal of a received list (as opposed to
// a failure to fetch one).
func refusedList(err error) bool {
	for _, target := range []error{meshapi.ErrDenyListSignature, meshapi.ErrDenyListMalformed, meshapi.ErrDenyListStale, meshapi.ErrDenyListConflict, meshapi.ErrDenyListGap, meshapi.ErrDenyListPremature} {
		if errors.Is(err, target) {
			return true
		}
	}
	return false
}

// denyListKey identifies a received list, so that the same refused list arriving
// again (by the watch and by every poll) is logged and audited once.
func denyListKey(s *meshapi.SignedDenyList) [sha256.Size]byte {
	h := sha256.New()
	for _, b := range [][]byte{s.Payload, s.Signature, s.Signer} {
		h.Write(binary.BigEndian.AppendUint64(nil, uint64(len(b))))
		h.Write(b)
	}
	return [sha256.Size]byte(h.Sum(nil))
}

// denyFeed is the Watch's copy of the CA's signed deny-list: it verifies every list
// received (from the directory watch or its own poll), applies the newer ones through
// publish, and refuses, logs, audits and counts the others. It also tracks how fresh
// the list is (Confirmed, CheckFresh) and whether the feed is reachable.
type denyFeed struct {
	cfg     Config
	conn    *conn
	log     *slog.Logger
	publish func(*meshapi.DenyList) // makes a newer list the one in force
	metrics *feedMetrics

	deny        atomic.Pointer[meshapi.DenyList]
	confirmed   atomic.Pointer[time.Time]
	denyMu      sync.Mutex        // serialises offer's check-then-store and publication
	lastRefused [sha256.Size]byte // guarded by denyMu: key of the last list refused
	feedMu      sync.Mutex
	health      feedHealth // guarded by feedMu
}

func newDenyFeed(cfg Config, c *conn, created time.Time, publish func(*meshapi.DenyList)) (*denyFeed, error) {
	metrics, err := newFeedMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	f := &denyFeed{cfg: cfg, conn: c, log: cfg.Logger, publish: publish, metrics: metrics}
	// A new proxy gets one staleness window to reach the CA.
	f.confirmed.Store(&created)
	metrics.confirmed.Set(float64(created.UnixNano()) / 1e9)
	return f, nil
}

// Confirmed returns when the deny-list in force was last confirmed current: the last
// time a fetch from the CA returned it, or a newer one, signed and verified. Until the
// first fetch it is when NewWatch was called, so a new proxy gets one staleness
// window to reach the CA.
func (d *denyFeed) Confirmed() time.Time { return *d.confirmed.Load() }

// CheckFresh returns nil while the deny-list was confirmed at most maxAge ago, and
// otherwise an error wrapping ErrFeedStale that says how old it is. It does not
// allocate unless it fails, so a proxy can call it on every handshake to fail closed
// when it can no longer learn of revocations. Safe for concurrent use.
func (d *denyFeed) CheckFresh(maxAge time.Duration) error {
	age := time.Since(d.Confirmed())
	if age <= maxAge {
		return nil
	}
	return fmt.Errorf("%w: deny list last confirmed %v ago, allowed %v", ErrFeedStale, age, maxAge)
}

// pollLoop fetches the deny-list at once and then every PollInterval (minus up to a
// tenth of jitter). Unlike the other loops it does not back off: a poll is cheap, and
// the point is to converge within one interval once the CA is reachable again.
func (d *denyFeed) pollLoop(ctx context.Context) {
	for {
		err := d.poll(ctx)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			d.pollFailed(err)
		}
		if !pause(ctx, d.cfg.PollInterval, true) {
			return
		}
	}
}

// poll fetches the deny-list once and offers it. It returns nil only when the answer
// verified as the list in force.
func (d *denyFeed) poll(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, defaultTimeout)
	defer cancel()
	answer, err := d.conn.do(ctx, "revocations", http.MethodGet, meshapi.RevocationsPath, nil, meshapi.MaxDirectoryResponse)
	if err != nil {
		return err
	}
	var s meshapi.SignedDenyList
	if err := json.Unmarshal(answer, &s); err != nil {
		err = fmt.Errorf("%w: %w", meshapi.ErrDenyListMalformed, err)
		d.refuse(feedSourcePoll, &meshapi.SignedDenyList{Payload: answer}, nil, err)
		return fmt.Errorf("ca: revocations: %w", err)
	}
	return d.offer(feedSourcePoll, &s)
}

// pollFailed records a failed poll: the outage (feedDownAfter in a row) is one Error
// and the feed-up gauge at 0; otherwise the first failure is a Warn and the rest Debug,
// except a refused list, which refuseDenyList has already logged.
func (d *denyFeed) pollFailed(err error) {
	d.feedMu.Lock()
	h, alert := d.health.failed()
	d.health = h
	d.feedMu.Unlock()
	switch {
	case alert:
		d.metrics.up.Set(0)
		d.log.Error("revocation feed unreachable", keyErr, err, keyAttempt, h.failures,
			keyFeedAge, time.Since(d.Confirmed()))
	case refusedList(err):
	case h.failures == 1:
		d.log.Warn("revocation poll failed", keyErr, err, keyAttempt, h.failures)
	default:
		d.log.Debug("revocation poll failed", keyErr, err, keyAttempt, h.failures)
	}
}

// confirm records that the list in force was verified current at now.
func (d *denyFeed) confirm(now time.Time) {
	// The watch and the poll confirm concurrently: never move the time back.
	for cur := d.confirmed.Load(); now.After(*cur); cur = d.confirmed.Load() {
		if d.confirmed.CompareAndSwap(cur, &now) {
			d.metrics.confirmed.Set(float64(now.UnixNano()) / 1e9)
			break
		}
	}
	d.metrics.up.Set(1)
	d.feedMu.Lock()
	h, recovered := d.health.succeeded()
	d.health = h
	d.feedMu.Unlock()
	if recovered {
		d.log.Info("revocation feed reachable again")
	}
}

// offer verifies a list received from source and applies it when it is newer
// than the one held; a refused list is logged, audited and counted, and the list held
// stays in force. It returns nil when s verified as the list in force (newer, or the
// one held), which confirms the feed.
func (d *denyFeed) offer(source string, s *meshapi.SignedDenyList) error {
	td, err := d.conn.trustDomain()
	if err != nil {
		// Not the list's fault: nothing to refuse, the fetch failed.
		return fmt.Errorf("ca: deny list: %w", err)
	}
	now := time.Now()
	l, err := meshapi.VerifyDenyList(s, td, d.conn.anchors.Roots(), now)
	if err != nil {
		d.refuse(source, s, nil, err)
		return err
	}

	// The lock makes check-then-store atomic between the watch and the poll, so that
	// states are published in version order.
	d.denyMu.Lock()
	held := d.deny.Load()
	newer, err := meshapi.NextDenyList(held, l, now)
	if err != nil || !newer {
		d.denyMu.Unlock()
		if err != nil {
			d.refuse(source, s, l, err)
			return err
		}
		d.confirm(now)
		return nil
	}
	d.deny.Store(l)
	d.lastRefused = [sha256.Size]byte{}
	// The feed's metrics and health are up to date before the state is published, so
	// that whoever reads them on Updated sees this list.
	lag := time.Since(l.IssuedAt)
	d.confirm(now)
	d.metrics.version.Set(float64(l.Version))
	d.metrics.lag.Observe(max(lag, 0).Seconds())
	d.publish(l)
	d.denyMu.Unlock()

	d.log.Debug("deny list published", keyVersion, l.Version, keyIDs, len(l.IDs), keySerials, len(l.Serials),
		keyFeedLag, lag, keyFeedSource, source)
	return nil
}

// refuse counts, logs and audits a refused list; l is the list when it
// verified (refused by meshapi.NextDenyList), nil when it did not. The same list refused
// again in a row is only counted: the watch and every poll bring it back until the
// CA publishes another.
func (d *denyFeed) refuse(source string, s *meshapi.SignedDenyList, l *meshapi.DenyList, err error) {
	reason := denyListRefusal(err)
	d.metrics.refused.WithLabelValues(reason).Inc()
	key := denyListKey(s)
	d.denyMu.Lock()
	repeated := key == d.lastRefused
	d.lastRefused = key
	held := d.deny.Load()
	d.denyMu.Unlock()
	if repeated {
		return
	}
	rec := audit.DenyListChange{Result: denyResultRefused, Reason: reason, Error: err.Error()}
	if held != nil {
		rec.Previous = held.Version
	}
	// Only a verified list's content is recorded; a forged one's claims are not.
	if l != nil {
		rec.Version, rec.IDs, rec.Serials = l.Version, len(l.IDs), len(l.Serials)
	}
	d.log.Error("deny list refused", keyReason, reason, keyErr, err, keyVersion, rec.Version,
		keyHeld, rec.Previous, keyFeedSource, source)
	d.audit(rec)
}

func (d *denyFeed) audit(rec audit.DenyListChange) {
	if d.cfg.Audit == nil {
		return
	}
	if err := d.cfg.Audit.Append(rec); err != nil {
		d.log.Error("audit deny list", keyErr, err, keyVersion, rec.Version, keyReason, rec.Reason)
	}
}
