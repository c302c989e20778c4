package meshapi

import "errors"

// ErrSign is wrapped by SignDenyList's error when the signer (the CA's key, in an HSM)
// fails to sign.
var ErrSign = errors.New("meshapi: sign deny list")

// ErrDenyListSignature is wrapped by VerifyDenyList's error for a deny-list that is not
// signed by a valid CA certificate of the trust domain: forged, tampered with, or
// signed by another CA.
var ErrDenyListSignature = errors.New("meshapi: deny list signature invalid")

// ErrDenyListMalformed is wrapped by VerifyDenyList's error for a correctly signed
// deny-list whose content breaks the format (unknown fields, another trust domain,
// unsorted or invalid entries).
var ErrDenyListMalformed = errors.New("meshapi: deny list malformed")

// ErrDenyListStale is wrapped by NextDenyList's error for a deny-list older than the
// one held: replayed or rolled back.
var ErrDenyListStale = errors.New("meshapi: deny list older than the one held")

// ErrDenyListConflict is wrapped by NextDenyList's error for a deny-list with the
// version of the one held but other content, or one that rewrites older versions.
var ErrDenyListConflict = errors.New("meshapi: deny list conflicts with the one held")

// ErrDenyListGap is wrapped by NextDenyList's error for a newer deny-list that lacks an
// entry of the one held. Lists are cumulative, so versions in between were lost or
// tampered with.
var ErrDenyListGap = errors.New("meshapi: deny list drops entries of the one held")

// ErrDenyListPremature is wrapped by NextDenyList's error for a newer deny-list that
// drops an entry as expired while its expiry is still ahead of the receiver's clock:
// the clocks disagree, and the list is accepted once the receiver's clock is past it.
var ErrDenyListPremature = errors.New("meshapi: deny list drops entries not yet expired")

// ErrDirectoryRollback is wrapped by the error refusing a directory document older than
// the State held: a stale or replayed answer must never bring back removed peers.
var ErrDirectoryRollback = errors.New("meshapi: directory version older than the one held")

// ErrInvalidID is wrapped by CheckWorkloadID's error: the ID is not a workload ID of
// the trust domain, so the CA neither issues nor lists it.
var ErrInvalidID = errors.New("ca: spiffe id not issuable by this ca")

// ErrInvalidRequest is wrapped by the error refusing a request body that breaks the
// rules (answered 400): both or neither of spiffe_id and serial, a missing or
// unprintable reason, a malformed serial.
var ErrInvalidRequest = errors.New("ca: invalid request")
