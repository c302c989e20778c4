package ca

import (
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

// DefaultMaxWatches is how many directory long-polls one client identity may hold at
// once (Config.MaxWatches): a proxy holds one; a few more cover a restart that
// overlaps the old poll. Each parked poll costs the CA a connection, a goroutine and a
// timer, so an identity may not park without bound.
const DefaultMaxWatches = 4

// watchLimit counts the directory long-polls each client identity holds. Safe for
// concurrent use; the zero value is not usable (see newWatchLimit).
type watchLimit struct {
	max     int
	mu      sync.Mutex
	held    map[spiffeid.ID]int // entries only while > 0, so bounded by live polls
	refused uint64              // since start; guarded by mu
	// seen is when each proxy (host ID) last started or ended a long-poll: every proxy
	// follows the directory, advertising or not, so these are the proxies a rotation
	// of the trust anchors must hear from. Pruned by followers.
	seen map[spiffeid.ID]time.Time
}

func newWatchLimit(limit int) *watchLimit {
	return &watchLimit{max: limit, held: make(map[spiffeid.ID]int), seen: make(map[spiffeid.ID]time.Time)}
}

// followers are the proxies holding a long-poll at now (seen now) or that held one
// since since (seen when it ended); older ones are forgotten.
func (l *watchLimit) followers(now, since time.Time) map[spiffeid.ID]time.Time {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[spiffeid.ID]time.Time, len(l.seen))
	for id, at := range l.seen {
		switch {
		case l.held[id] > 0:
			out[id] = now
		case at.Before(since):
			delete(l.seen, id)
		default:
			out[id] = at
		}
	}
	return out
}

// sawLocked records that id, when a proxy, started or ended a long-poll now.
func (l *watchLimit) sawLocked(id spiffeid.ID) {
	if meshapi.IsHostID(id) {
		l.seen[id] = time.Now()
	}
}

// acquire takes one of id's slots. It returns the release function, or ok false and
// the number of refusals so far (this one included) when id holds max polls already.
func (l *watchLimit) acquire(id spiffeid.ID) (release func(), refused uint64, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.held[id] >= l.max {
		l.refused++
		return nil, l.refused, false
	}
	l.held[id]++
	l.sawLocked(id)
	return func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.sawLocked(id)
		if l.held[id]--; l.held[id] <= 0 {
			delete(l.held, id)
		}
	}, 0, true
}

// WatchRefusal is the audit record of a directory long-poll refused because its
// caller already holds Config.MaxWatches of them (HTTP 429).
type WatchRefusal struct {
	audit.Actor     // the caller's SPIFFE ID and serial
	Limit       int `json:"limit"` // Config.MaxWatches
	// Refused counts the long-polls refused for this reason since the CA started,
	// this one included.
	Refused uint64 `json:"refused_total"`
}

// Kind returns "directory_watch_refused".
func (WatchRefusal) Kind() string { return "directory_watch_refused" }

// refuseWatch answers a long-poll over the caller's limit with 429, logs it at Warn
// and audits it with the running count.
func (s *Server) refuseWatch(w http.ResponseWriter, r *http.Request, id spiffeid.ID, refused uint64) {
	s.log.LogAttrs(r.Context(), slog.LevelWarn, "directory watch refused: too many concurrent watches",
		slog.String(keySPIFFEID, id.String()), slog.Int("limit", s.cfg.MaxWatches), slog.Uint64("refused_total", refused))
	s.audit(WatchRefusal{Actor: audit.TLSActor(r.TLS), Limit: s.cfg.MaxWatches, Refused: refused})
	w.Header().Set("Retry-After", strconv.Itoa(1))
	writeStepError(w, http.StatusTooManyRequests, "too many concurrent directory watches for "+id.String())
}
