// Package metricreg registers a component's Prometheus collectors with the
// Registerer its configuration names. It does not create, name or gather
// metrics: each component owns its collectors.
package metricreg

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Register registers every collector with reg, or none of them: on the first
// error it unregisters those it had registered, so that a component whose
// construction failed leaves reg as it was and a corrected retry can
// register again. A nil reg registers nothing.
func Register(reg prometheus.Registerer, cs ...prometheus.Collector) error {
	if reg == nil {
		return nil
	}
	for i, c := range cs {
		if err := reg.Register(c); err != nil {
			for _, done := range cs[:i] {
				reg.Unregister(done)
			}
			return fmt.Errorf("register metrics: %w", err)
		}
	}
	return nil
}

// Shared registers c with reg, or returns the collector of the same type
// already registered under the same descriptor, so that a component
// recreated in one process (a reopened log, a reloaded config) keeps counting
// in the series it started.
func Shared[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	err := reg.Register(c)
	if err == nil {
		return c, nil
	}
	if are, ok := errors.AsType[prometheus.AlreadyRegisteredError](err); ok {
		if existing, ok := are.ExistingCollector.(C); ok {
			return existing, nil
		}
	}
	return c, fmt.Errorf("register metrics: %w", err)
}
