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
)

// Metric names and labels.
const (
	metricRotations = "agentmesh_rotator_rotations_total"
	metricExpiry    = "agentmesh_rotator_svid_expiry_timestamp_seconds"
	metricRenewAt   = "agentmesh_rotator_svid_renew_timestamp_seconds"
	metricOverlap   = "agentmesh_rotator_overlap_svids"
	labelTrigger    = "trigger"
	labelResult     = "result"
	labelSPIFFEID   = "spiffe_id"
)
