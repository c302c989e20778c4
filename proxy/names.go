package proxy

import "github.com/agentmesh/agentmesh/audit"

// Metric names, label keys and log attribute keys: stable strings that
// dashboards, alerts and log queries depend on, kept in one place.
const (
	metricHandshakes        = "agentmesh_proxy_handshakes_total"
	metricHandshakeDuration = "agentmesh_proxy_handshake_duration_seconds"
	metricActiveConnections = "agentmesh_proxy_active_connections"
	metricBytes             = "agentmesh_proxy_bytes_total"
	metricCaptured          = "agentmesh_proxy_captured_total"
	metricRevoked           = "agentmesh_proxy_connections_revoked_total"
	metricTicketRotations   = "agentmesh_proxy_ticket_key_rotations_total"
	metricDrained           = "agentmesh_proxy_connections_drained_total"
	metricPoolConnections   = "agentmesh_proxy_pool_connections"
	metricStreams           = "agentmesh_proxy_streams_total"
	metricQUICKeyUpdates    = "agentmesh_proxy_quic_key_updates_total"
	metricAttestations      = "agentmesh_proxy_attestations_total"
	metricAuthzDenied       = "agentmesh_proxy_authz_denied_total"
	metricPoolEnded         = "agentmesh_proxy_pool_ended_total"
	metricStreamRefusals    = "agentmesh_proxy_stream_refusals_total"
	metricRefused           = "agentmesh_proxy_connections_refused_total"

	labelDirection = "direction"
	labelResult    = "result"
	labelMode      = "mode"
	labelTrigger   = "trigger"
	labelTransport = "transport"
	labelInitiator = "initiator"
	labelRule      = "rule"
	labelReason    = "reason"
)

// Why the session-ticket keys changed (the trigger label). A reset's trigger
// is its cause (ResetTicketKeys), so the label and the audit record agree.
const (
	triggerPeriod   = "period"    // the newest key reached TicketKeyPeriod
	triggerDenyList = "deny_list" // SetDenyList replaced every key

	// The causes ResetTicketKeys documents; the label is created up front
	// for these, any other cause gets its own on first use.
	causeCompromise = "compromise"
	causePolicy     = "policy"
	causeCARemoved  = "ca_removed"
	causeUnknown    = "unspecified" // ResetTicketKeys with an empty cause
)

// Key lifecycle (audit.KeyState): what kind of key, its states (NIST SP
// 800-57 names; ticket keys skip pre-activation: they are usable the moment
// they exist) and the cause of a scheduled transition.
const (
	keyKindTicket = audit.KeyTicket

	keyStateActive    = audit.PhaseActive    // the ticket key that encrypts
	keyStateOverlap   = audit.PhaseOverlap   // decrypts only
	keyStateDestroyed = audit.PhaseDestroyed // dropped and its bytes zeroed

	causeSchedule = "schedule" // TicketKeyPeriod
)

// Log attribute keys.
const (
	keyDirection = "direction"
	keyPeerID    = "peer_id"
	keySerial    = "serial"
	keyLocal     = "local_serial"
	keyResumed   = "resumed"
	keyPeerAddr  = "peer_addr"
	keyDst       = "dst"
	keyReason    = "reason"
	keyResult    = "result"
	keyDuration  = "duration"
	keyBytesIn   = "bytes_in"
	keyBytesOut  = "bytes_out"
	keyListen    = "listen"
	keyBackoff   = "backoff"
	keyErr       = "err"
	keyMode      = "mode"
	keyTransport = "transport"
	keyKey       = "key"
	keyVersion   = "version"
	keyFrom      = "from"
	keyTo        = "to"
	keyCause     = "cause"
	keyGrace     = "grace"
	keyClosed    = "closed"
	keyLocalID   = "local_id"
	keySrcID     = "src_id"
	keyDstID     = "dst_id"
	keyPort      = "port"
	keyRule      = "rule"
)

// Log attribute keys of the summary line of refusals before authentication
// (flushRefusals).
const (
	keyAttempts   = "attempts"
	keySources    = "sources"
	keyReasons    = "reasons"
	keyUnrecorded = "unrecorded"
)

// Handshake results in the result label: the strings of audit.Handshake.Result.
const (
	resultOK      = string(audit.ResultOK)
	resultRefused = string(audit.ResultRefused) // a verification or policy decision said no, or the peer misbehaved
	resultError   = string(audit.ResultError)   // an operational failure: no SVID, unreachable target, shutdown
)

// Outcomes of an outbound connection that exist only in the result label of
// agentmesh_proxy_captured_total (the audit record says result ok and reason
// passthrough, or result refused and reason unknown_destination).
const (
	resultPassthrough = "passthrough" // dialed directly in plain TCP (UnknownPassthrough)
	resultDenied      = "denied"      // no proxy at the destination (UnknownDeny)
)

// Transports, as in audit.Handshake.Transport and audit.Connection.Transport:
// TransportTLS, TransportH2 and TransportQUIC, plus these two outbound
// outcomes that are not tunnels.
const (
	transportTCP  = "tcp"  // passthrough: plain TCP to the destination, no tunnel
	transportNone = "none" // refused before anything was dialed
)

// Attestation outcomes (the result label of agentmesh_proxy_attestations_total).
const (
	attestedAgent   = "agent"   // the uid is a registered agent's: its identity
	attestedHost    = "host"    // not an agent's (or unknown): the host identity
	attestedRefused = "refused" // not an agent's, and Unattested is UnattestedDeny
)

// Who started a QUIC key update (the initiator label).
const (
	initiatorLocal = "local"
	initiatorPeer  = "peer"
)

// Connection close reasons (audit.Connection.Reason).
const (
	closeEOF     = "eof"            // both directions finished with a clean EOF
	closeClosed  = "closed"         // closed by CloseWhere or shutdown
	closeError   = "error"          // a read or write failed
	closeRevoked = "revoked"        // the deny-list denied the peer's certificate or ours (SetDenyList)
	closeDrained = "drained"        // our credential's overlap ended and its grace passed (Drain)
	closePolicy  = "policy_revoked" // the authorization policy no longer allows it (SetPolicy)
)
