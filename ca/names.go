package ca

// Log attribute keys.
const (
	keySPIFFEID      = "spiffe_id"
	keySerial        = "serial"
	keyNotAfter      = "not_after"
	keyErr           = "err"
	keyAddr          = "addr"
	keyURL           = "url"
	keyStateDir      = "state_dir"
	keyTrustDomain   = "trust_domain"
	keyPeerUID       = "peer_uid"
	keyStatus        = "status"
	keyPath          = "path"
	keyMethod        = "method"
	keyDuration      = "duration"
	keyRetryIn       = "retry_in"
	keyKMS           = "kms"
	keyFirstStart    = "first_start"
	keyExpires       = "expires"
	keyRootSPKI      = "root_spki_sha256"
	keyOp            = "op"
	keyMode          = "mode"
	keyAdminSocket   = "admin_socket"
	keyAddress       = "address"
	keyAddresses     = "addresses"
	keyClaimedBy     = "claimed_by"
	keyTunnelPort    = "tunnel_port"
	keyVersion       = "version"
	keyLastHeartbeat = "last_heartbeat"
	keyInitiator     = "initiator"
	keyCutoff        = "cutoff"
	keyReason        = "reason"
	keyListVersion   = "list_version"
	keySerials       = "serials"
	keyIDs           = "ids"
	keyKind          = "kind"
	keyFleetID       = "fleet_rotation_id"
	keyHost          = "host"
	keyUID           = "uid"
	keyPort          = "port"
	keyEntries       = "entries"
	keyHosts         = "hosts"
	keyPrefixes      = "prefixes"
	keyRemoteAddr    = "remote_addr"
	keyOrigin        = "origin"
	keySize          = "size"
	keyHeldSize      = "held_size"
)

// Files and directories inside Config.StateDir. hsm.SoftHSM names the embedded
// token's files (fileSoftHSMConf, filePIN, dirTokens); they are repeated here for New's
// "token created" check and for tests.
const (
	fileRoot         = "root.crt"
	fileIntermediate = "intermediate.crt"
	fileSoftHSMConf  = "softhsm2.conf"
	filePIN          = "hsm.pin" // where earlier versions kept the token's PIN
	fileAdminSocket  = "admin.sock"
	fileLock         = "lock"
	dirTokens        = "tokens"
	dirDB            = "db"
	fileDB           = "ca.db"
	fileDenyList     = "denylist.json"
	// fileFleetRotation holds the latest FleetRotation, so that IDs keep increasing
	// across restarts.
	fileFleetRotation = "fleet-rotation.json"
	// fileEntries holds the registration entries (0600).
	fileEntries = "entries.json"
	// fileClaims holds the address claims of hosts (0600).
	fileClaims = "claims.json"
	// dirWitness holds the witnessed audit logs, one file per origin (witness.go).
	dirWitness = "witness"
)
