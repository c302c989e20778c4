package proxy

import (
	"cmp"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agentmesh/agentmesh/audit"
)

// minTicketCheck is the shortest wait between two timed ticket-key checks,
// so a tiny period or a clock jump cannot make the rotation loop spin.
// Decisions never depend on it: every ticket use checks the keys itself.
const minTicketCheck = time.Second

// ticketKey is one session-ticket key. The bytes are ours (crypto/tls
// derives its AES and HMAC keys from a copy), so a dropped key is zeroed.
type ticketKey struct {
	key     [32]byte
	version uint64 // 1, 2, ... per proxy, in creation order
	created time.Time
}

// TicketKeyStatus describes one session-ticket key, for status.
type TicketKeyStatus struct {
	// Version numbers the proxy's ticket keys 1, 2, ... in creation order;
	// the audit log's key_state records (key "ticket") use the same number.
	Version uint64 `json:"version"`
	// State is "active" (seals new tickets, and opens them) or "overlap"
	// (opens tickets only). Destroyed keys are not listed.
	State audit.KeyPhase `json:"state"`
	// Created is when the key was made (Config.Now).
	Created time.Time `json:"created"`
	// EncryptUntil is when the key stops sealing tickets: for the active
	// key, one period after Created; for an overlap key, when its successor
	// took over.
	EncryptUntil time.Time `json:"encrypt_until"`
	// DecryptUntil is when the key stops opening tickets and is
	// destroyed, two periods after Created (a reset destroys it sooner).
	// Both bounds use the period in force now (TicketKeyPeriod capped by
	// the current SVID), which a new SVID may change.
	DecryptUntil time.Time `json:"decrypt_until"`
}

// ticketKeys owns the session-ticket keys of every server configuration the
// proxy builds: engine holds them (SetSessionTicketKeys) and is used only for
// EncryptTicket and DecryptTicket, from WrapSession and UnwrapSession. One
// set serves every local certificate, so a rotation of the SVID does not
// need new keys, and a reset replaces them in one place.
//
// Schedule: the newest key encrypts until it is one period old; a key
// decrypts until it is two periods old and is then zeroed. So no ticket
// resumes more than two periods after it was issued, whether or not
// rotations ran on time, and at most two keys are alive. (crypto/tls
// announces a fixed seven-day lifetime in its tickets; these bounds are the
// ones that apply.)
//
// Every state change becomes an audit.KeyState. Changes happen under mu,
// sometimes on a handshake, and auditing is I/O that may block, so they are
// queued in pending and emitted after mu is released (flush).
type ticketKeys struct {
	engine    *tls.Config
	rotations func(trigger string)     // counts a new key, by trigger
	emit      func(rec audit.KeyState) // audits and logs one transition

	// view is what the hot path reads without the lock: the creation
	// times of the live keys, newest first.
	view atomic.Pointer[[]time.Time]

	mu      sync.Mutex
	keys    []*ticketKey     // newest first; guarded by mu
	version uint64           // of the newest key made; guarded by mu
	pending []audit.KeyState // transitions not emitted yet, in order; guarded by mu

	// emitMu makes flushes take turns, so records leave in the order the
	// transitions happened even when two flushes race.
	emitMu sync.Mutex
}

// newTicketKeys makes the first key. Its activation is queued, not emitted:
// the proxy is not running yet, and the first flush (Run, or any change)
// sends it ahead of everything else.
func newTicketKeys(now time.Time, rotations func(trigger string), emit func(audit.KeyState)) (*ticketKeys, error) {
	t := &ticketKeys{engine: &tls.Config{}, rotations: rotations, emit: emit}
	k, err := t.newKey(now)
	if err != nil {
		return nil, err
	}
	t.install([]*ticketKey{k})
	t.note(k, "", keyStateActive, causeSchedule)
	return t, nil
}

// newKey makes the next version. Called with mu held (or before t is
// shared); a failure consumes no version.
func (t *ticketKeys) newKey(now time.Time) (*ticketKey, error) {
	k, err := newTicketKey(now)
	if err != nil {
		return nil, err
	}
	t.number(k)
	return k, nil
}

// newTicketKey makes a key without a version (see number).
func newTicketKey(now time.Time) (*ticketKey, error) {
	k := &ticketKey{created: now}
	if _, err := rand.Read(k.key[:]); err != nil {
		return nil, err
	}
	return k, nil
}

// number gives k the next version. Called with mu held.
func (t *ticketKeys) number(k *ticketKey) {
	t.version++
	k.version = t.version
}

// install makes keys the live set. Called with mu held (or before t is
// shared).
func (t *ticketKeys) install(keys []*ticketKey) {
	raw := make([][32]byte, len(keys))
	created := make([]time.Time, len(keys))
	for i, k := range keys {
		raw[i] = k.key
		created[i] = k.created
	}
	t.engine.SetSessionTicketKeys(raw)
	clear(raw)
	t.keys = keys
	t.view.Store(&created)
}

// note queues the audit record of k going from one state to another.
// Called with mu held (or before t is shared).
func (t *ticketKeys) note(k *ticketKey, from, to audit.KeyPhase, cause string) {
	t.pending = append(t.pending, audit.KeyState{
		Key: keyKindTicket, Version: k.version, From: from, To: to, Cause: cause,
	})
}

// destroy zeroes k and queues its last record. Called with mu held, after
// install has taken k out of the engine.
func (t *ticketKeys) destroy(k *ticketKey, from audit.KeyPhase, cause string) {
	clear(k.key[:])
	t.note(k, from, keyStateDestroyed, cause)
}

// flush emits the queued records, oldest first. Called without mu.
func (t *ticketKeys) flush() {
	t.emitMu.Lock()
	defer t.emitMu.Unlock()
	t.mu.Lock()
	recs := t.pending
	t.pending = nil
	t.mu.Unlock()
	for _, r := range recs {
		t.emit(r)
	}
}

// due reports whether the schedule asks for a change at now: the newest
// key has encrypted for a full period, or the oldest is past decrypting.
func due(created []time.Time, now time.Time, period time.Duration) bool {
	return len(created) == 0 || now.Sub(created[0]) >= period ||
		now.Sub(created[len(created)-1]) >= 2*period
}

// check applies the schedule at now. It is called on every ticket use (so
// the bounds hold exactly, even with no timed check) and by run. A failure
// of the random source keeps the current keys: they stay within their
// bounds, and the next check tries again.
//
// Records, in this order: the new key active, the previous active key in
// overlap (or destroyed, when the check came so late that it is past
// decrypting too), then every dropped key destroyed, newest first.
func (t *ticketKeys) check(now time.Time, period time.Duration) {
	if !due(*t.view.Load(), now, period) {
		return
	}
	defer t.flush() // deferred first: runs after the unlock
	t.mu.Lock()
	defer t.mu.Unlock()
	var active *ticketKey
	if len(t.keys) > 0 {
		active = t.keys[0]
	}
	keep := make([]*ticketKey, 0, 2)
	var drop []*ticketKey
	for _, k := range t.keys {
		if now.Sub(k.created) < 2*period {
			keep = append(keep, k)
		} else {
			drop = append(drop, k)
		}
	}
	var next *ticketKey
	if len(keep) == 0 || now.Sub(keep[0].created) >= period {
		if k, err := t.newKey(now); err == nil {
			next = k
			keep = append([]*ticketKey{k}, keep...)
		}
	}
	for len(keep) > 2 {
		drop = append(drop, keep[len(keep)-1])
		keep = keep[:len(keep)-1]
	}
	switch {
	case len(keep) == 0:
		// No live key and no new one: keep the old ones rather than
		// none (SetSessionTicketKeys needs one); unwrapSession's check
		// of the ticket's issue time still bounds what resumes.
		return
	case next == nil && len(drop) == 0:
		return // a concurrent check did the work
	}
	t.install(keep)
	if next != nil {
		t.note(next, "", keyStateActive, causeSchedule)
		if len(keep) > 1 && keep[1] == active {
			t.note(active, keyStateActive, keyStateOverlap, causeSchedule)
		}
		t.rotations(triggerPeriod)
	}
	slices.SortFunc(drop, func(a, b *ticketKey) int { return cmp.Compare(b.version, a.version) })
	for _, k := range drop {
		from := keyStateOverlap
		if k == active {
			from = keyStateActive
		}
		t.destroy(k, from, causeSchedule)
	}
}

// live reports whether a key created at created may still decrypt at now.
// crypto/tls does not tell which key decrypted a ticket, so the ticket's
// own issue time (carried in the ticket) is checked against the same bound.
func live(created, now time.Time, period time.Duration) bool {
	return now.Sub(created) < 2*period
}

// reset replaces every key with a new one, so that no ticket issued before
// resumes: every held key is destroyed (newest first), then the new one is
// active, all with cause. If the random source fails the old keys stay and
// the error is returned; resumption still re-runs VerifyConnection, which
// enforces the current deny-list and policy on its own. (Since Go 1.24
// crypto/rand.Read does not fail: it crashes the program instead.)
func (t *ticketKeys) reset(now time.Time, cause string) error {
	k, err := newTicketKey(now)
	if err != nil {
		return err
	}
	t.mu.Lock()
	t.number(k)
	old := t.keys
	t.install([]*ticketKey{k})
	for i, o := range old {
		from := keyStateOverlap
		if i == 0 {
			from = keyStateActive
		}
		t.destroy(o, from, cause)
	}
	t.note(k, "", keyStateActive, cause)
	t.rotations(cause)
	t.mu.Unlock()
	t.flush()
	return nil
}

// status describes the live keys, newest first, with the bounds period
// gives them.
func (t *ticketKeys) status(period time.Duration) []TicketKeyStatus {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]TicketKeyStatus, len(t.keys))
	for i, k := range t.keys {
		out[i] = TicketKeyStatus{
			Version:      k.version,
			State:        keyStateActive,
			Created:      k.created,
			EncryptUntil: k.created.Add(period),
			DecryptUntil: k.created.Add(2 * period),
		}
		if i > 0 {
			out[i].State = keyStateOverlap
			out[i].EncryptUntil = t.keys[i-1].created
		}
	}
	return out
}

// next is how long until the schedule is due again at period.
func (t *ticketKeys) next(now time.Time, period time.Duration) time.Duration {
	created := *t.view.Load()
	if len(created) == 0 {
		return 0
	}
	wait := created[0].Add(period).Sub(now)
	if oldest := created[len(created)-1].Add(2 * period).Sub(now); oldest < wait {
		wait = oldest
	}
	return wait
}

// rotateTicketKeys keeps the schedule on time while no ticket is used, so
// expired keys are erased promptly rather than at the next handshake. It
// returns when ctx is done.
func (p *Proxy) rotateTicketKeys(ctx context.Context) {
	for {
		period := p.ticketPeriod(p.currentLeaf())
		now := p.cfg.Now()
		p.tickets.check(now, period)
		timer := time.NewTimer(max(p.tickets.next(now, period), minTicketCheck))
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-timer.C:
		}
	}
}

// ticketPeriod is TicketKeyPeriod capped at half the lifetime of leaf (the
// SVID tickets are issued under), so that a ticket never lives longer than
// the certificate lifetime allows. leaf may be nil (no SVID).
func (p *Proxy) ticketPeriod(leaf *x509.Certificate) time.Duration {
	period := p.cfg.TicketKeyPeriod
	if leaf == nil {
		return period
	}
	// The floor keeps a degenerate certificate from asking for a new key
	// on every ticket.
	if half := leaf.NotAfter.Sub(leaf.NotBefore) / 2; half < period {
		period = max(half, time.Second)
	}
	return period
}

// currentLeaf is the leaf of the current SVID, nil when there is none.
func (p *Proxy) currentLeaf() *x509.Certificate {
	cert, err := p.cfg.Credentials.TLSCertificate()
	if err != nil || cert == nil {
		return nil
	}
	return cert.Leaf
}

// TicketKeys describes the live session-ticket keys, newest (the active
// one) first, after applying the schedule at the current time. Safe for
// concurrent use.
func (p *Proxy) TicketKeys() []TicketKeyStatus {
	period := p.ticketPeriod(p.currentLeaf())
	p.tickets.check(p.cfg.Now(), period)
	return p.tickets.status(period)
}

// ResetTicketKeys replaces every session-ticket key at once and empties the
// client session caches (what SetDenyList does), for the other security
// events, so that no session resumes across them: a resumption skips the
// certificate exchange, and these events may change what a full handshake
// would present or accept. cause names the event in the key_state records
// and in the trigger label of agentmesh_proxy_ticket_key_rotations_total:
// "compromise" (one of our keys was compromised), "policy" (authorization
// changed), "ca_removed" (a CA left the trust bundle); SetDenyList uses
// "deny_list". An empty cause is recorded as "unspecified". Handshakes in
// flight finish on the old configuration; none of their tickets resumes.
// For the same reason every pooled connection (h2, quic) stops taking new
// streams (the peer of an inbound one is asked to, with GOAWAY or its quic
// equivalent): the next agent connection to a peer makes a full handshake,
// while the streams already open go on, as established tls connections do.
// Safe for concurrent use.
func (p *Proxy) ResetTicketKeys(cause string) {
	if cause == "" {
		cause = causeUnknown
	}
	if err := p.tickets.reset(p.cfg.Now(), cause); err != nil {
		// Resumption still goes through VerifyConnection, which applies
		// the current bundle, deny-list and policy; only the key change
		// is missing.
		p.cfg.Logger.LogAttrs(context.Background(), slog.LevelError, "session-ticket keys not replaced",
			slog.String(keyCause, cause), slog.Any(keyErr, err))
	}
	p.dropSessions()
	p.retireMuxes()
}

// recordKeyState audits and logs one ticket-key transition. A failed append
// is logged; Audit.Err then stops new handshakes, so nothing goes on
// unrecorded for long.
func (p *Proxy) recordKeyState(rec audit.KeyState) {
	ctx := context.Background()
	p.cfg.Logger.LogAttrs(ctx, slog.LevelInfo, "key state",
		slog.String(keyKey, string(rec.Key)),
		slog.Uint64(keyVersion, rec.Version),
		slog.String(keyFrom, string(rec.From)),
		slog.String(keyTo, string(rec.To)),
		slog.String(keyCause, rec.Cause))
	if p.cfg.Audit == nil {
		return
	}
	if err := p.cfg.Audit.Append(rec); err != nil {
		p.cfg.Logger.LogAttrs(ctx, slog.LevelError, "audit key state record",
			slog.String(keyKey, string(rec.Key)), slog.Uint64(keyVersion, rec.Version), slog.Any(keyErr, err))
	}
}
