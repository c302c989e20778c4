package ca

import (
	"errors"
	"github.com/agentmesh/agentmesh/meshapi"

	"github.com/agentmesh/agentmesh/ca/authority"
	"github.com/agentmesh/agentmesh/hsm"
)

// ErrInvalidConfig is returned by New for a configuration that cannot work
// (a missing required field, a lifetime out of range, a malformed URL). The message names
// the field.
var ErrInvalidConfig = authority.ErrInvalidConfig

// ErrTrustDomainMismatch is returned by New when the state directory holds a root for
// another trust domain than Config.TrustDomain. Use the state directory of that trust
// domain, or a new one.
var ErrTrustDomainMismatch = authority.ErrTrustDomainMismatch

// ErrStateInUse is returned by New when another CA (in this process or another one) holds
// the lock on the state directory.
var ErrStateInUse = errors.New("ca: state directory in use by another agentmesh ca")

// ErrHSM wraps every failure to reach or use the PKCS#11 token: module not loadable,
// token not found, wrong PIN, a key missing or not matching its certificate, a
// signature that fails. The underlying PKCS#11 error is wrapped too. It is
// hsm.ErrToken, so errors.Is matches either name.
var ErrHSM = hsm.ErrToken

// ErrSoftHSMInUse is returned by New when this process already has the SoftHSM2 module
// initialised with another configuration. SoftHSM reads SOFTHSM2_CONF once per
// process (at C_Initialize), so one process can serve the embedded SoftHSM token of one
// state directory at a time; close the other Server first, or use Config.KMS. It is
// hsm.ErrSoftHSMInUse.
var ErrSoftHSMInUse = hsm.ErrSoftHSMInUse

// ErrInvalidID is returned by Token and the admin API for a SPIFFE ID outside the CA's
// trust domain or without a path (the trust domain's own ID is not a workload).
var ErrInvalidID = authority.ErrInvalidID

// ErrServerClosed is returned by Run when it is called a second time or after Close.
var ErrServerClosed = errors.New("ca: server already run or closed")

// ErrInvalidRequest is returned by Revoke (and answered 400 by the APIs) for a request
// that breaks the rules: both or neither of spiffe_id and serial, a missing or
// unprintable reason, a malformed serial.
var ErrInvalidRequest = meshapi.ErrInvalidRequest

// ErrUnknownSerial is returned by Revoke (and answered 404 by the APIs) for a serial
// this CA never issued.
var ErrUnknownSerial = errors.New("ca: no certificate with this serial was issued here")

// ErrRevoked is returned when an identity or a certificate serial is revoked: the CA
// refuses bootstrap tokens, directory registration and issuance for a revoked identity
// until it is reinstated, and renewal and registration of its certificates issued
// before the revocation for good.
var ErrRevoked = errors.New("ca: revoked")

// ErrEntryConflict is wrapped by the error of Server.RegisterEntry (and answered 409 by
// the admin socket) for an entry whose ID is registered already, or whose uid or port
// another agent of the same host holds. The message names the holder.
var ErrEntryConflict = errors.New("ca: registration entry conflict")

// ErrEntryNotFound is wrapped by the error of Server.UnregisterEntry (and answered 404
// by the admin socket) for an ID without a registration entry; the CA also refuses to
// renew an agent SVID (/agent/...) with it.
var ErrEntryNotFound = errors.New("ca: no registration entry")

// ErrClaimConflict is wrapped by the error refusing an address or prefix that another
// host may claim: a directory registration advertising it (409 on the mesh API), or
// Server.SetHostClaim with a prefix overlapping another host's claim (409 on the admin
// socket). The message names the holder.
var ErrClaimConflict = errors.New("ca: address claimed by another host")

// ErrClaimNotAllowed is wrapped by the error refusing a directory registration (403)
// that advertises an address outside its host's claim, or, for a host without one,
// comes from an address it does not advertise (nothing to learn: an operator must set
// the claim with `agentmesh register HOST --addr CIDR`).
var ErrClaimNotAllowed = errors.New("ca: address not allowed to this host")

// ErrRotationInProgress is returned (and answered 409) when a rotation of the trust
// anchors is started while one runs, or excluded from or aborted when none does or
// too late; the message names the current phase.
var ErrRotationInProgress = errors.New("ca: rotation of the trust anchors")
