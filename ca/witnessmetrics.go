package ca

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics of the witnessing of audit logs.
const (
	metricWitnessCheckpoints  = "agentmesh_ca_audit_checkpoints_total"
	metricWitnessedLogs       = "agentmesh_ca_audit_witnessed_logs"
	metricOldestCheckpointAge = "agentmesh_ca_audit_oldest_checkpoint_age_seconds"
	metricCALogCosignedAge    = "agentmesh_ca_audit_ca_log_cosigned_age_seconds"
	labelResult               = "result"
)

// witnessMetrics always exist, so that nothing checks for nil; New registers them
// only when Config.Registerer is set. The gauges are computed from the store at each
// scrape, so a log turns stale without anything happening.
type witnessMetrics struct {
	checkpoints *prometheus.CounterVec
	gauges      *witnessGauges
}

func newWitnessMetrics(s *Server) *witnessMetrics {
	m := &witnessMetrics{
		checkpoints: prometheus.NewCounterVec(prometheus.CounterOpts{Name: metricWitnessCheckpoints,
			Help: "Audit checkpoints proxies sent the CA to witness, by result: accepted (cosigned), conflict (sent from another size than held), inconsistent (refused: the log was rewritten, cut or forked), invalid."},
			[]string{labelResult}),
		gauges: &witnessGauges{s: s,
			logs: prometheus.NewDesc(metricWitnessedLogs,
				"Audit logs the CA witnesses, by state: ok, stale (no checkpoint within the stale interval), inconsistent (a checkpoint was refused; until `agentmesh ca audit forget`).",
				[]string{labelState}, nil),
			oldest: prometheus.NewDesc(metricOldestCheckpointAge,
				"Age of the oldest last checkpoint among the audit logs the CA witnesses; 0 when none.", nil, nil),
			caAge: prometheus.NewDesc(metricCALogCosignedAge,
				"Time since a proxy last returned a checkpoint of the CA's own audit log cosigned; absent until one did.", nil, nil),
		},
	}
	for _, r := range allCheckpointResults {
		m.checkpoints.WithLabelValues(string(r))
	}
	return m
}

func (m *witnessMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.checkpoints, m.gauges}
}

// witnessGauges computes the witness's gauges from the store.
type witnessGauges struct {
	s                   *Server
	logs, oldest, caAge *prometheus.Desc
}

func (g *witnessGauges) Describe(ch chan<- *prometheus.Desc) {
	ch <- g.logs
	ch <- g.oldest
	ch <- g.caAge
}

func (g *witnessGauges) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	counts := map[witnessState]int{}
	var oldest, caSeen time.Time
	for _, r := range g.s.witness.records() {
		counts[r.state(now, g.s.cfg.WitnessStaleAfter)]++
		if oldest.IsZero() || r.LastSeen.Before(oldest) {
			oldest = r.LastSeen
		}
		if r.CATime.After(caSeen) {
			caSeen = r.CATime
		}
	}
	for _, st := range allWitnessStates {
		ch <- prometheus.MustNewConstMetric(g.logs, prometheus.GaugeValue, float64(counts[st]), string(st))
	}
	age := 0.0
	if !oldest.IsZero() {
		age = now.Sub(oldest).Seconds()
	}
	ch <- prometheus.MustNewConstMetric(g.oldest, prometheus.GaugeValue, age)
	if !caSeen.IsZero() {
		ch <- prometheus.MustNewConstMetric(g.caAge, prometheus.GaugeValue, now.Sub(caSeen).Seconds())
	}
}
