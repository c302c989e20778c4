package rotator

// Log attribute keys.
const (
	keySPIFFEID  = "spiffe_id"
	keyTrigger   = "trigger"
	keySerial    = "serial"
	keyOldSerial = "old_serial"
	keyNotAfter  = "not_after"
	keyRenewAt   = "renew_at"
	keyAttempt   = "attempt"
	keyRetryIn   = "retry_in"
	keyErr       = "err"
	keySerials   = "serials"
	keyCurrent   = "current"
	keyVersion   = "version"
	keyFrom      = "from"
	keyTo        = "to"
	keyCause     = "cause"
	keyGrace     = "grace"
	keyClosed    = "closed"
	keyInitiator = "initiator"
	keyReason    = "reason"
	keyPolicy    = "policy"
	keyFile      = "file"
	keyLabel     = "label"
	keyResult    = "result"
)

// Metric names and labels.
const (
	metricRotations       = "agentmesh_rotator_rotations_total"
	metricExpiry          = "agentmesh_rotator_svid_expiry_timestamp_seconds"
	metricRenewAt         = "agentmesh_rotator_svid_renew_timestamp_seconds"
	metricOverlap         = "agentmesh_rotator_overlap_svids"
	metricRevoked         = "agentmesh_rotator_revoked_svids_total"
	metricKeyStates       = "agentmesh_rotator_key_transitions_total"
	metricDestroyFailures = "agentmesh_rotator_key_destroy_failures_total"
	metricDrained         = "agentmesh_rotator_drained_connections_total"
	metricRestores        = "agentmesh_rotator_restores_total"
	metricStoreFailures   = "agentmesh_rotator_store_failures_total"
	metricNeedsToken      = "agentmesh_rotator_needs_token"
	labelTrigger          = "trigger"
	labelState            = "state"
	labelResult           = "result"
	labelSPIFFEID         = "spiffe_id"
)
