package testaudit

import (
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/audit"
)

// DenyLists is an audit sink (Append) that keeps the deny-list records a revocation
// feed writes, in order; any other record arrives as one with result
// "unexpected KIND".
type DenyLists chan audit.DenyListChange

// Append records e.
func (s DenyLists) Append(e audit.Event) error {
	rec, ok := e.(audit.DenyListChange)
	if !ok {
		rec = audit.DenyListChange{Result: "unexpected " + e.Kind()}
	}
	s <- rec
	return nil
}

// Next returns the next record, failing the test after a generous bound (a guard, not
// synchronisation).
func (s DenyLists) Next(t testing.TB) audit.DenyListChange {
	t.Helper()
	select {
	case rec := <-s:
		return rec
	case <-time.After(10 * time.Second):
		t.Fatal("no audit record within 10s")
		return audit.DenyListChange{}
	}
}
