// Package testaudit runs real audit logs for tests: a file, its writer running until the
// test ends, and the writer's result checked at cleanup. It is a test helper, never imported
// by non-test code.
package testaudit

import (
	"context"
	"testing"

	"github.com/agentmesh/agentmesh/audit"
)

// Start opens an audit log at path and runs its writer until the test ends; a writer that
// fails fails the test.
func Start(t testing.TB, path string) *audit.Log {
	t.Helper()
	l, err := audit.Open(audit.Config{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	Run(t, l)
	return l
}

// Run runs l's writer until the test ends (its cleanup, so after cleanups registered
// later); a writer that fails fails the test.
func Run(t testing.TB, l *audit.Log) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("audit Run: %v", err)
		}
	})
}
