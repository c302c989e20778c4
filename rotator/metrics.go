package rotator

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/metricreg"
)

type metrics struct {
	rotations *prometheus.CounterVec
	expiry    prometheus.Gauge
	renewAt   prometheus.Gauge
	overlap   prometheus.Gauge
	revoked   prometheus.Counter

	keyStates       *prometheus.CounterVec
	destroyFailures prometheus.Counter
	drained         prometheus.Counter

	restores      *prometheus.CounterVec
	storeFailures prometheus.Counter
	needsToken    prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer, id spiffeid.ID) (*metrics, error) {
	labels := prometheus.Labels{labelSPIFFEID: id.String()}
	m := &metrics{
		rotations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricRotations, Help: "SVID rotation attempts by trigger and result.", ConstLabels: labels,
		}, []string{labelTrigger, labelResult}),
		expiry: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricExpiry, Help: "NotAfter of the current SVID, as a Unix timestamp.", ConstLabels: labels,
		}),
		renewAt: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricRenewAt, Help: "When the current SVID is due for renewal, as a Unix timestamp.", ConstLabels: labels,
		}),
		overlap: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricOverlap, Help: "Superseded SVIDs still in overlap.", ConstLabels: labels,
		}),
		revoked: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricRevoked, Help: "SVIDs (current or in overlap) dropped because they were revoked.", ConstLabels: labels,
		}),
		keyStates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricKeyStates, Help: "SVID key state transitions by the state entered.", ConstLabels: labels,
		}, []string{labelState}),
		destroyFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricDestroyFailures, Help: "SVID keys the key store failed to destroy; they are still held.", ConstLabels: labels,
		}),
		drained: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricDrained, Help: "Connections closed because the credential that authenticated them was retired.", ConstLabels: labels,
		}),
		restores: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricRestores, Help: "What the start found of the SVID kept in the state file, by result (none, restored, expired, unusable).", ConstLabels: labels,
		}, []string{labelResult}),
		storeFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricStoreFailures, Help: "Failed writes or removals of the SVID kept in the state file.", ConstLabels: labels,
		}),
		needsToken: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricNeedsToken, Help: "1 while the CA refuses the identity's enrolment for good: only a new bootstrap token gets an SVID once the current one expires.", ConstLabels: labels,
		}),
	}
	if reg == nil {
		return m, nil
	}
	if err := metricreg.Register(reg, m.rotations, m.expiry, m.renewAt, m.overlap, m.revoked, m.keyStates, m.destroyFailures, m.drained,
		m.restores, m.storeFailures, m.needsToken); err != nil {
		return nil, fmt.Errorf("rotator: %w", err)
	}
	return m, nil
}

func (m *metrics) rotated(trigger, result string) {
	m.rotations.WithLabelValues(trigger, result).Inc()
}

func (m *metrics) transition(to string) {
	m.keyStates.WithLabelValues(to).Inc()
}

func (m *metrics) published(s *snapshot) {
	switch {
	case s.current != nil:
		m.expiry.Set(float64(s.current.notAfter().Unix()))
		m.renewAt.Set(float64(s.renewAt.Unix()))
	case s.dropped != nil:
		// Nothing is presented: an expiry still in the future would hide it from alerts.
		m.expiry.Set(0)
		m.renewAt.Set(0)
	}
	m.overlap.Set(float64(len(s.overlap)))
	if s.needsToken {
		m.needsToken.Set(1)
	} else {
		m.needsToken.Set(0)
	}
}
