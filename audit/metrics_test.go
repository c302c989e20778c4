package audit_test

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/audit"
)

func TestMetricsReopenSameRegistry(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	path := tempLog(t)
	for range 2 {
		l := start(t, audit.Config{Path: path, Registerer: reg})
		if err := l.Append(handshake(0)); err != nil {
			t.Fatal(err)
		}
		if err := l.stop(); err != nil {
			t.Fatal(err)
		}
	}
	if got := counter(t, reg, "agentmesh_audit_records_total", ""); got != 2 {
		t.Errorf("records_total = %v, want 2 (one series across reopen)", got)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "agentmesh_audit_fsync_seconds" && mf.GetMetric()[0].GetHistogram().GetSampleCount() < 2 {
			t.Errorf("fsync_seconds count = %d, want >= 2", mf.GetMetric()[0].GetHistogram().GetSampleCount())
		}
	}
}

// counter returns the value of a counter, selecting the series by its op label when op is set.
func counter(t *testing.T, reg *prometheus.Registry, name, op string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if op == "" {
				return m.GetCounter().GetValue()
			}
			for _, lp := range m.GetLabel() {
				if lp.GetName() == "op" && lp.GetValue() == op {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("metric %s{op=%q} not found", name, op)
	return 0
}
