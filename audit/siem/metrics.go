package siem

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/internal/metricreg"
)

// Metric names, label values and log attribute keys.
const (
	metricSent        = "agentmesh_audit_siem_sent_total"
	metricFiltered    = "agentmesh_audit_siem_filtered_total"
	metricResent      = "agentmesh_audit_siem_resent_total"
	metricBacklog     = "agentmesh_audit_siem_backlog_records"
	metricBacklogFull = "agentmesh_audit_siem_backlog_full"
	metricConnected   = "agentmesh_audit_siem_connected"
	metricErrors      = "agentmesh_audit_siem_errors_total"

	labelOp = "op"

	opDial   = "dial"   // connecting or the TLS handshake failed
	opWrite  = "write"  // writing to the receiver failed, or it closed the connection
	opRead   = "read"   // reading the log failed
	opCursor = "cursor" // the cursor file could not be read or written
	opAudit  = "audit"  // the backlog alert's record could not be appended
	// opChain: a line of a segment does not continue the chain (a changed file); it is
	// sent as it is, and audit verify names it.
	opChain = "chain"

	keyErr     = "err"
	keyAddress = "address"
	keyResend  = "resend_from"
	keyNext    = "next"
	keyBacklog = "backlog"
	keyRetryIn = "retry_in"
)

// metrics always exist so the loop never checks for nil; they are registered only when
// Config.Registerer is set.
type metrics struct {
	sent, filtered, resent prometheus.Counter
	backlog, full, conn    prometheus.Gauge
	errors                 *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		sent: prometheus.NewCounter(prometheus.CounterOpts{Name: metricSent,
			Help: "Audit records written to the SIEM connection, resent ones included."}),
		filtered: prometheus.NewCounter(prometheus.CounterOpts{Name: metricFiltered,
			Help: "Audit records the SIEM filter left out (they stay in the log)."}),
		resent: prometheus.NewCounter(prometheus.CounterOpts{Name: metricResent,
			Help: "Audit records sent again after a broken SIEM connection (the at-least-once window)."}),
		backlog: prometheus.NewGauge(prometheus.GaugeOpts{Name: metricBacklog,
			Help: "Audit records not yet sent to the SIEM (estimated from the unread bytes of the log)."}),
		full: prometheus.NewGauge(prometheus.GaugeOpts{Name: metricBacklogFull,
			Help: "1 while more audit records than the configured maximum wait for the SIEM; none is dropped."}),
		conn: prometheus.NewGauge(prometheus.GaugeOpts{Name: metricConnected,
			Help: "1 while the SIEM connection is up."}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: metricErrors,
			Help: "SIEM delivery failures by operation: dial, write, read (the log), cursor, audit, chain (a record that does not follow the one before, sent as it is)."},
			[]string{labelOp}),
	}
	for _, op := range []string{opDial, opWrite, opRead, opCursor, opAudit, opChain} {
		m.errors.WithLabelValues(op)
	}
	if reg == nil {
		return m, nil
	}
	err := metricreg.Register(reg, m.sent, m.filtered, m.resent, m.backlog, m.full, m.conn, m.errors)
	return m, err
}
