package metricreg_test

import (
	"errors"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/internal/metricreg"
)

func counter(name string) prometheus.Counter {
	return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: name})
}

func TestRegisterAllOrNone(t *testing.T) {
	reg := prometheus.NewRegistry()
	taken := counter("b_total")
	if err := reg.Register(taken); err != nil {
		t.Fatal(err)
	}
	a, b := counter("a_total"), counter("b_total")
	err := metricreg.Register(reg, a, b)
	if !errors.As(err, new(prometheus.AlreadyRegisteredError)) {
		t.Fatalf("Register = %v, want an AlreadyRegisteredError", err)
	}
	// a was rolled back: registering it again succeeds.
	if err := reg.Register(a); err != nil {
		t.Fatalf("a still registered after the failed Register: %v", err)
	}
	reg.Unregister(a)
	reg.Unregister(taken)
	if err := metricreg.Register(reg, a, b); err != nil {
		t.Fatalf("retry: %v", err)
	}
	if err := metricreg.Register(nil, a); err != nil {
		t.Fatalf("nil Registerer: %v", err)
	}
}

func TestSharedReusesExisting(t *testing.T) {
	reg := prometheus.NewRegistry()
	first, err := metricreg.Shared(reg, counter("c_total"))
	if err != nil {
		t.Fatal(err)
	}
	second, err := metricreg.Shared(reg, counter("c_total"))
	if err != nil {
		t.Fatal(err)
	}
	if second != first {
		t.Fatal("Shared returned a new collector instead of the registered one")
	}
	// Same name, another type: not reusable.
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "c_total", Help: "c_total"})
	if _, err := metricreg.Shared(reg, g); err == nil {
		t.Fatal("Shared accepted a gauge under a counter's name")
	}
}
