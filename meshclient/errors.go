package meshclient

import (
	"errors"
	"time"
)

// ErrInvalidConfig is returned by the constructors for a configuration that cannot
// work.
var ErrInvalidConfig = errors.New("ca: invalid configuration")

// ErrNoToken is returned by Client.Enroll when ClientConfig.Token is nil.
var ErrNoToken = errors.New("ca: no bootstrap token source configured")

// ErrRunning is returned by Watch.Run and Heartbeat.Run when they are already running.
var ErrRunning = errors.New("ca: directory client already running")

// ErrFeedStale is wrapped by Watch.CheckFresh's error when the deny-list has not been
// confirmed with the CA for longer than allowed.
var ErrFeedStale = errors.New("ca: revocation feed stale")

// ErrStaleStep is wrapped by AckAnchor's error when the CA answers that the step
// acknowledged is not its current one: acknowledging it again cannot succeed.
var ErrStaleStep = errors.New("ca: anchor rotation step is not current")

// defaultTimeout bounds each request to the CA but the long-poll.
const defaultTimeout = 10 * time.Second

// Log attribute keys, the same as the CA's.
const (
	keyErr        = "err"
	keyRetryIn    = "retry_in"
	keyAddresses  = "addresses"
	keyTunnelPort = "tunnel_port"
	keyVersion    = "version"
	keyAttempt    = "attempt"
	keyPeers      = "peers"
	keyHeld       = "held_version"
	keyReason     = "reason"
	keySerial     = "serial"
	keySerials    = "serials"
	keyIDs        = "ids"
	keySPIFFEID   = "spiffe_id"
	keyNotAfter   = "not_after"
	keyOp         = "op"
	keyDuration   = "duration"
	keyURL        = "url"
)
