package meshclient

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agentmesh/agentmesh/meshapi"
)

// minWatchInterval spaces long-polls that come back unchanged and early (a CA shutting
// down answers at once), so such answers cannot make the client spin.
const minWatchInterval = time.Second

// Watch keeps this proxy's copy of the mesh state current: it long-polls the CA's
// directory (whose answers also carry the deny-list and fleet rotations), and polls the
// deny-list every Config.PollInterval as a fallback for a stuck watch. Each new state
// is published as an immutable *meshapi.State (State) and signalled on Updated. State,
// Updated, Confirmed and CheckFresh are safe for concurrent use and never block on the
// network; before the first directory arrives the State knows no peer. Since the copy
// is kept while the CA is unreachable, peers that vanished meanwhile stay listed; the
// tunnel's peer verification still applies.
type Watch struct {
	cfg     Config
	conn    *conn
	log     *slog.Logger
	state   atomic.Pointer[meshapi.State]
	mu      sync.Mutex // serialises publications' check-then-store
	updated chan struct{}
	running atomic.Bool
	feed    *denyFeed
}

// NewWatch checks cfg and returns a Watch. It does not contact the CA and starts no
// goroutine: call Run.
func NewWatch(cfg Config) (*Watch, error) {
	cfg = cfg.withDefaults()
	c, err := newConn(cfg)
	if err != nil {
		return nil, err
	}
	w := &Watch{cfg: cfg, conn: c, log: cfg.Logger, updated: make(chan struct{}, 1)}
	w.state.Store(&meshapi.State{})
	if w.feed, err = newDenyFeed(cfg, c, time.Now(), w.publishDenyList); err != nil {
		return nil, err
	}
	return w, nil
}

// State is the mesh state held: never nil, immutable, safe to share. Read it again
// rather than keep it.
func (w *Watch) State() *meshapi.State { return w.state.Load() }

// Updated returns a channel that receives after a new State has been published (a new
// directory version or deny-list). Notifications coalesce (buffer of one): after a
// receive, read State again rather than count.
func (w *Watch) Updated() <-chan struct{} { return w.updated }

// Confirmed returns when the deny-list in force was last confirmed current: the last
// time a fetch from the CA returned it, or a newer one, signed and verified. Until the
// first fetch it is when NewWatch was called, so a new proxy gets one staleness window
// to reach the CA.
func (w *Watch) Confirmed() time.Time { return w.feed.Confirmed() }

// CheckFresh returns nil while the deny-list was confirmed at most maxAge ago, and
// otherwise an error wrapping ErrFeedStale that says how old it is. It does not
// allocate unless it fails, so a proxy can call it on every handshake to fail closed
// when it can no longer learn of revocations. Safe for concurrent use.
func (w *Watch) CheckFresh(maxAge time.Duration) error { return w.feed.CheckFresh(maxAge) }

// Run watches the directory with long-polls and polls the deny-list every
// Config.PollInterval until ctx is done. Failures (CA unreachable, refusal, bad
// answer) are logged and retried, the watch with capped exponential backoff and full
// jitter; they never end Run. It returns nil once ctx is done and its loops have
// exited, or ErrRunning if Run is already running.
func (w *Watch) Run(ctx context.Context) error {
	if !w.running.CompareAndSwap(false, true) {
		return ErrRunning
	}
	defer w.running.Store(false)
	defer w.conn.close()
	var wg sync.WaitGroup
	wg.Go(func() { w.watchLoop(ctx) })
	wg.Go(func() { w.feed.pollLoop(ctx) })
	wg.Wait()
	return nil
}

func (w *Watch) watchLoop(ctx context.Context) {
	for {
		start := time.Now()
		changed, err := retry(ctx, w.log, "directory watch failed", maxRetryBase, w.cfg.Heartbeat,
			func() (bool, error) {
				start = time.Now()
				return w.once(ctx)
			})
		if err != nil || ctx.Err() != nil {
			return
		}
		if wait := minWatchInterval - time.Since(start); !changed && wait > 0 && !pause(ctx, wait, false) {
			return
		}
	}
}

// once long-polls the directory for a version other than the one held and applies
// the answer; it reports whether a new version was published.
func (w *Watch) once(ctx context.Context) (bool, error) {
	next, err := w.fetch(ctx, w.State().Version())
	if err != nil {
		return false, err
	}
	return w.apply(next)
}

// fetch long-polls the directory for a version other than held. The deny-list in
// the answer is offered first, and on its own: a refused list does not stop the
// directory from being applied, nor does a malformed directory stop a valid list.
func (w *Watch) fetch(ctx context.Context, held uint64) (*meshapi.State, error) {
	ctx, cancel := context.WithTimeout(ctx, longPollWait+meshapi.WatchGrace)
	defer cancel()
	path := meshapi.DirectoryPath + "?since=" + strconv.FormatUint(held, 10) + "&wait=" + longPollWait.String()
	answer, err := w.conn.do(ctx, "directory", http.MethodGet, path, nil, meshapi.MaxDirectoryResponse)
	if err != nil {
		return nil, err
	}
	doc, err := meshapi.ParseDirectory(answer)
	if err != nil {
		return nil, fmt.Errorf("ca: directory: %w", err)
	}
	if doc.Revocations != nil {
		// Refusals are logged and audited there; the poll reports an outage.
		_ = w.feed.offer(feedSourceDirectory, doc.Revocations)
	}
	next, err := meshapi.NewState(doc, w.conn.selfID())
	if err != nil {
		return nil, fmt.Errorf("ca: directory: %w", err)
	}
	return next, nil
}

// apply publishes the directory of next if it is newer than the one held. The same
// version is not a change; an older one is refused (meshapi.ErrDirectoryRollback): a
// stale or replayed answer must never bring back peers that were removed.
func (w *Watch) apply(next *meshapi.State) (bool, error) {
	w.mu.Lock()
	cur := w.state.Load()
	switch {
	case next.Version() == cur.Version():
		w.mu.Unlock()
		return false, nil
	case next.Version() < cur.Version():
		w.mu.Unlock()
		return false, fmt.Errorf("%w: got version %d, hold %d", meshapi.ErrDirectoryRollback, next.Version(), cur.Version())
	}
	w.state.Store(cur.WithDirectory(next))
	w.mu.Unlock()
	w.signal()
	w.log.Debug("directory version applied", keyVersion, next.Version(), keyHeld, cur.Version(), keyPeers, next.Peers())
	return true, nil
}

// publishDenyList publishes a state with the deny-list l.
func (w *Watch) publishDenyList(l *meshapi.DenyList) {
	w.mu.Lock()
	w.state.Store(w.state.Load().WithDenyList(l))
	w.mu.Unlock()
	w.signal()
}

func (w *Watch) signal() {
	select {
	case w.updated <- struct{}{}:
	default:
	}
}
