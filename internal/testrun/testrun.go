// Package testrun runs a component's Run(ctx) for the length of a test.
package testrun

import (
	"context"
	"testing"
)

// Start calls run in a goroutine with a context that stop cancels; stop then waits for
// run to return and fails the test if it returned an error. stop runs at the end of
// the test too, and only once.
func Start(tb testing.TB, run func(context.Context) error) (stop func()) {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("Run: %v", err)
		}
	}
	tb.Cleanup(stop)
	return stop
}
