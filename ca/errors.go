package ca

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/agentmesh/agentmesh/ca/authority"
	"github.com/agentmesh/agentmesh/hsm"
)

// ErrInvalidConfig is returned by New and NewClient for a configuration that cannot work
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

// ErrNoToken is returned by Client.Enroll when ClientConfig.Token is nil.
var ErrNoToken = errors.New("ca: no bootstrap token source configured")

// ErrDirectoryRunning is returned by Directory.Run when it is already running.
var ErrDirectoryRunning = errors.New("ca: directory client already running")

// ErrDirectoryRollback is wrapped by the error a Directory logs when the CA answers
// with an older directory version than the one held. The answer is refused: a stale or
// replayed directory must never bring back removed peers.
var ErrDirectoryRollback = errors.New("ca: directory version older than the one held")

// ResponseError is an answer of the CA that is not a success: a step-ca API error on the
// HTTPS API, or an admin-socket error for RequestToken. Message is the CA's own message
// (step-ca keeps the details in its log).
type ResponseError struct {
	Op      string // "sign", "rekey", "token", "register", "directory", "agent token", "register entry", ...
	Status  int    // HTTP status code
	Message string
}

func (e *ResponseError) Error() string {
	msg := e.Message
	if msg == "" {
		msg = http.StatusText(e.Status)
	}
	return fmt.Sprintf("ca: %s: %d %s", e.Op, e.Status, msg)
}

// Permanent reports whether retrying the same request cannot succeed: true for 4xx
// answers (bad or used token, expired or revoked certificate, refused request) except 408
// Request Timeout and 429 Too Many Requests. The rotator switches from Renew to Enroll on
// a permanent error.
func (e *ResponseError) Permanent() bool {
	return e.Status >= 400 && e.Status < 500 &&
		e.Status != http.StatusRequestTimeout && e.Status != http.StatusTooManyRequests
}

// ErrInvalidRequest is returned by Revoke (and answered 400 by the APIs) for a request
// that breaks the rules: both or neither of spiffe_id and serial, a missing or
// unprintable reason, a malformed serial.
var ErrInvalidRequest = errors.New("ca: invalid request")

// ErrUnknownSerial is returned by Revoke (and answered 404 by the APIs) for a serial
// this CA never issued.
var ErrUnknownSerial = errors.New("ca: no certificate with this serial was issued here")

// ErrRevoked is returned when an identity or a certificate serial is revoked: the CA
// refuses bootstrap tokens, directory registration and issuance for a revoked identity
// until it is reinstated, and renewal and registration of its certificates issued
// before the revocation for good.
var ErrRevoked = errors.New("ca: revoked")

// ErrDenyListSignature is wrapped by VerifyDenyList's error for a deny-list that is not
// signed by a valid CA certificate of the trust domain: forged, tampered with, or
// signed by another CA.
var ErrDenyListSignature = errors.New("ca: deny list signature invalid")

// ErrDenyListMalformed is wrapped by VerifyDenyList's error for a correctly signed
// deny-list whose content breaks the format (unknown fields, another trust domain,
// unsorted or invalid entries).
var ErrDenyListMalformed = errors.New("ca: deny list malformed")

// ErrDenyListStale is wrapped by NextDenyList's error for a deny-list older than the
// one held: replayed or rolled back.
var ErrDenyListStale = errors.New("ca: deny list older than the one held")

// ErrDenyListConflict is wrapped by NextDenyList's error for a deny-list with the
// version of the one held but other content, or one that rewrites older versions.
var ErrDenyListConflict = errors.New("ca: deny list conflicts with the one held")

// ErrDenyListGap is wrapped by NextDenyList's error for a newer deny-list that lacks an
// entry of the one held. Lists are cumulative, so versions in between were lost or
// tampered with.
var ErrDenyListGap = errors.New("ca: deny list drops entries of the one held")

// ErrDenyListPremature is wrapped by NextDenyList's error for a newer deny-list that
// drops an entry as expired while its expiry is still ahead of the receiver's clock:
// the clocks disagree, and the list is accepted once the receiver's clock is past it.
var ErrDenyListPremature = errors.New("ca: deny list drops entries not yet expired")

// ErrFeedStale is wrapped by Directory.CheckFresh's error when the deny-list has not
// been confirmed with the CA for longer than allowed.
var ErrFeedStale = errors.New("ca: revocation feed stale")

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
