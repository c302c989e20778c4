package ca

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/meshapi"
)

// Metrics of the rotation of the trust anchors.
const (
	metricRotationPhase        = "agentmesh_ca_rotation_phase"
	metricRotationMembers      = "agentmesh_ca_rotation_members"
	metricRotationPhaseSeconds = "agentmesh_ca_rotation_phase_seconds"
	metricAnchorNotAfter       = "agentmesh_ca_anchor_not_after_seconds"
	labelPhase                 = "phase"
	labelState                 = "state"
	labelRole                  = "role"
	labelFingerprint           = "fingerprint"
)

// memberState is a member's standing in the current phase (the state label).
type memberState string

const (
	memberAcked    memberState = "acked"
	memberMissing  memberState = "missing"
	memberExcluded memberState = "excluded"
)

// anchorRole is what a certificate is to the CA (the role label).
type anchorRole string

const (
	roleRoot             anchorRole = "root"              // a trust anchor in force
	roleIntermediate     anchorRole = "intermediate"      // the intermediate issuing now
	roleNextIntermediate anchorRole = "next_intermediate" // prepared, not yet issuing
)

var allAnchorPhases = []meshapi.AnchorPhase{meshapi.PhasePrepare, meshapi.PhaseDistribute, meshapi.PhaseActivate,
	meshapi.PhaseRetire, meshapi.PhaseDestroy, meshapi.PhaseAbort, meshapi.PhaseAbortRetire, meshapi.PhaseDone,
	meshapi.PhaseAborted}

type anchorMetrics struct {
	phase        *prometheus.GaugeVec
	members      *prometheus.GaugeVec
	phaseSeconds *prometheus.GaugeVec
	notAfter     *prometheus.GaugeVec
}

func newAnchorMetrics() *anchorMetrics {
	m := &anchorMetrics{
		phase: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: metricRotationPhase,
			Help: "Phase of the rotation of the CA's trust anchors: 1 for the current (or last) one, 0 for the others."},
			[]string{labelPhase}),
		members: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: metricRotationMembers,
			Help: "Proxies of the running rotation of the trust anchors that acknowledged the current phase, are missing, or are excluded."},
			[]string{labelState}),
		phaseSeconds: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: metricRotationPhaseSeconds,
			Help: "Seconds the current (or last) rotation of the trust anchors spent in each phase, the current one so far."},
			[]string{labelPhase}),
		notAfter: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: metricAnchorNotAfter,
			Help: "Expiry (Unix seconds) of the CA's trust anchors and intermediates, by role and key fingerprint."},
			[]string{labelRole, labelFingerprint}),
	}
	for _, p := range allAnchorPhases {
		m.phase.WithLabelValues(string(p))
	}
	for _, st := range []memberState{memberAcked, memberMissing, memberExcluded} {
		m.members.WithLabelValues(string(st))
	}
	return m
}

func (m *anchorMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.phase, m.members, m.phaseSeconds, m.notAfter}
}

// updateAnchorMetricsLocked sets the metrics from the record and the authority
// (s.anchor.mu held).
func (s *Server) updateAnchorMetricsLocked(now time.Time) {
	m := s.anchor.metrics
	m.notAfter.Reset()
	setNotAfter := func(role anchorRole, fp string, t time.Time) {
		m.notAfter.WithLabelValues(string(role), fp).Set(float64(t.Unix()))
	}
	for _, a := range s.anchor.auth.Anchors() {
		setNotAfter(roleRoot, meshapi.KeyFingerprint(a), a.NotAfter)
	}
	inter := s.anchor.auth.Active().Intermediate
	setNotAfter(roleIntermediate, meshapi.KeyFingerprint(inter), inter.NotAfter)
	if next, ok := s.anchor.auth.Next(); ok {
		setNotAfter(roleNextIntermediate, meshapi.KeyFingerprint(next.Intermediate), next.Intermediate.NotAfter)
	}
	rec := s.anchor.rec
	if rec == nil {
		return
	}
	for _, p := range allAnchorPhases {
		v := 0.0
		if p == rec.Phase {
			v = 1
		}
		m.phase.WithLabelValues(string(p)).Set(v)
	}
	counts := map[memberState]int{}
	for _, mb := range rec.Members {
		switch {
		case !rec.Phase.Acknowledged():
			// Nothing awaited: prepare, destroy, or the rotation ended.
		case mb.Excluded:
			counts[memberExcluded]++
		case mb.Acked == rec.Phase:
			counts[memberAcked]++
		default:
			counts[memberMissing]++
		}
	}
	for _, st := range []memberState{memberAcked, memberMissing, memberExcluded} {
		m.members.WithLabelValues(string(st)).Set(float64(counts[st]))
	}
	m.phaseSeconds.Reset()
	for _, pt := range rec.Phases {
		m.phaseSeconds.WithLabelValues(string(pt.Phase)).Set(float64(pt.MS) / 1000)
	}
	if !rec.Phase.Ended() {
		m.phaseSeconds.WithLabelValues(string(rec.Phase)).Set(now.Sub(rec.Since).Seconds())
	}
}
