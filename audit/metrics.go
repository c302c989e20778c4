package audit

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/internal/metricreg"
)

// Metric names, label keys and log attribute keys.
const (
	metricRecords = "agentmesh_audit_records_total"
	metricFsync   = "agentmesh_audit_fsync_seconds"
	metricErrors  = "agentmesh_audit_errors_total"
	// metricUnavailable is the alert: 1 while the log refuses records after a failure.
	metricUnavailable = "agentmesh_audit_unavailable"

	metricCheckpoints    = "agentmesh_audit_checkpoints_total"
	metricCheckpointSize = "agentmesh_audit_checkpoint_size"
	metricWitnessedSize  = "agentmesh_audit_witnessed_size"
	metricCheckpointLag  = "agentmesh_audit_checkpoint_lag_seconds"
	labelResult          = "result"

	resultSigned    = "signed"
	resultWitnessed = "witnessed"
	resultConflict  = "conflict" // the witness held another size; retried from it
	resultRefused   = "refused"  // the witness or the log found the log rewritten
	resultError     = "error"

	labelOp = "op"

	opEncode = "encode" // Append refused an invalid event
	opWrite  = "write"
	opFsync  = "fsync"
	opClose  = "close"
	opRotate = "rotate"
	opHashes = "hashes" // writing the Merkle hash file
	// opTruncate: cutting a failed batch off the file failed too; retried before writing.
	opTruncate = "truncate"

	keyPath         = "path"
	keyErr          = "err"
	keyOp           = "op"
	keySeq          = "seq"
	keySize         = "size"
	keySegment      = "segment"
	keyDroppedBytes = "dropped_bytes"
)

// metrics always exist so the hot path never checks for nil; they are registered only when
// Config.Registerer is set.
type metrics struct {
	records prometheus.Counter
	fsync   prometheus.Histogram
	errors  *prometheus.CounterVec
	// unavailable is 1 while a write or fsync failure lasts.
	unavailable prometheus.Gauge

	checkpoints    *prometheus.CounterVec
	checkpointSize prometheus.Gauge
	witnessedSize  prometheus.Gauge
	checkpointLag  prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		records: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricRecords,
			Help: "Audit records written and fsynced.",
		}),
		fsync: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: metricFsync,
			Help: "Duration of the fsync that commits one batch of audit records.",
			// 100µs (cached or battery-backed) to ~3s (a struggling volume).
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricErrors,
			Help: "Audit log failures by operation: encode (event refused), write, fsync, truncate (cutting a failed batch off), close. Retries while the volume fails count again.",
		}, []string{labelOp}),
		unavailable: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricUnavailable,
			Help: "1 while the audit log refuses records because a write or fsync failed (the proxy then refuses new connections); 0 once a retry succeeded.",
		}),
		checkpoints: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricCheckpoints,
			Help: "Audit checkpoint rounds by result: signed, witnessed (cosigned), conflict (the witness held another size), refused (the log was found rewritten or cut), error.",
		}, []string{labelResult}),
		checkpointSize: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricCheckpointSize,
			Help: "Size (records) of the latest signed audit checkpoint.",
		}),
		witnessedSize: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricWitnessedSize,
			Help: "Size (records) of the latest audit checkpoint cosigned by the witness.",
		}),
		checkpointLag: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricCheckpointLag,
			Help: "Age of the oldest audit record not yet in a cosigned checkpoint; 0 when all are, and for a log without a witness.",
		}),
	}
	// Pre-create the series so dashboards see zeros instead of gaps.
	for _, op := range []string{opEncode, opWrite, opFsync, opTruncate, opClose, opRotate, opHashes} {
		m.errors.WithLabelValues(op)
	}
	for _, r := range []string{resultSigned, resultWitnessed, resultConflict, resultRefused, resultError} {
		m.checkpoints.WithLabelValues(r)
	}
	if reg == nil {
		return m, nil
	}
	var err error
	if m.records, err = metricreg.Shared(reg, m.records); err != nil {
		return nil, err
	}
	if m.fsync, err = metricreg.Shared(reg, m.fsync); err != nil {
		return nil, err
	}
	if m.errors, err = metricreg.Shared(reg, m.errors); err != nil {
		return nil, err
	}
	if m.unavailable, err = metricreg.Shared(reg, m.unavailable); err != nil {
		return nil, err
	}
	if m.checkpoints, err = metricreg.Shared(reg, m.checkpoints); err != nil {
		return nil, err
	}
	for _, g := range []*prometheus.Gauge{&m.checkpointSize, &m.witnessedSize, &m.checkpointLag} {
		if *g, err = metricreg.Shared(reg, *g); err != nil {
			return nil, err
		}
	}
	return m, nil
}
