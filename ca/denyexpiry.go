package ca

import (
	"context"
	"github.com/agentmesh/agentmesh/meshapi"
	"time"
)

// pruneRecheck bounds how long the pruning loop sleeps between looks at the list, on
// top of the wake-up at each publication: it is also the delay before retrying a
// failed publication.
const pruneRecheck = 30 * time.Second

// nextExpiry is the earliest expiry of an entry of l, zero when none expires.
func nextExpiry(l *meshapi.DenyList) time.Time {
	var first time.Time
	consider := func(t time.Time) {
		if !t.IsZero() && (first.IsZero() || t.Before(first)) {
			first = t
		}
	}
	for _, e := range l.IDs {
		consider(e.NotAfter)
	}
	for _, e := range l.Serials {
		consider(e.NotAfter)
	}
	for _, e := range l.Issuers {
		consider(e.NotAfter)
	}
	return first
}

// pruneLoop keeps the deny-list bounded by the live certificates: whenever an entry's
// certificates have all expired, it publishes the next version without it (see
// nextDenyList), until ctx is done. Every publication prunes too; this covers a CA
// that publishes nothing else.
func (s *Server) pruneLoop(ctx context.Context) {
	failed := false
	for {
		wait := pruneRecheck
		if first := nextExpiry(s.deny.Load().list); !first.IsZero() && !failed {
			wait = min(max(time.Until(first), 0), pruneRecheck)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-s.deny.wake:
			t.Stop()
			if !failed {
				continue // recompute the wait with the new list
			}
		case <-t.C:
		}
		first := nextExpiry(s.deny.Load().list)
		if first.IsZero() || time.Now().Before(first) {
			continue
		}
		s.deny.mu.Lock()
		_, err := s.publishMarks(time.Now())
		s.deny.mu.Unlock()
		// After a failure, retry after pruneRecheck rather than at once.
		failed = err != nil
		if err != nil {
			s.log.Error("deny list pruning failed; retrying", keyErr, err)
		}
	}
}
