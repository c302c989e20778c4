package ca

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/audit"
)

// Metric of the CA's certificate issuance.
const (
	metricIssueDuration = "agentmesh_ca_issue_duration_seconds"
	labelAction         = "action"
)

// issueMetrics times every enrolment, renewal and rekey the CA answers, as the
// issuance audit record classifies it: its _count is the issuance rate.
type issueMetrics struct{ duration *prometheus.HistogramVec }

func newIssueMetrics() *issueMetrics {
	return &issueMetrics{duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: metricIssueDuration,
		Help: "Time the CA took to answer an enrolment (/sign), renewal or rekey, by action (enroll, renew, rekey) and result (ok, refused, error).",
		// 1 ms (SoftHSM next door) to 10 s (a slow network HSM, a busy database).
		Buckets: []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10},
	}, []string{labelAction, labelResult})}
}

// observe is authority.Config.Issued.
func (m *issueMetrics) observe(action audit.IssueAction, result audit.IssueResult, took time.Duration) {
	m.duration.WithLabelValues(string(action), string(result)).Observe(took.Seconds())
}
