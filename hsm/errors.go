package hsm

import "errors"

// ErrToken wraps every failure to reach or use a PKCS#11 token: module not loadable,
// malformed URI, token not found, wrong PIN, a PKCS#11 call that fails. The underlying
// PKCS#11 error is wrapped too, except where its text would carry the URI (and so
// possibly a pin-value).
var ErrToken = errors.New("hsm: pkcs11 token")

// ErrSoftHSMInUse is returned by SoftHSM when this process already has the SoftHSM2
// module set up with another configuration, or initialised outside this package.
// SoftHSM reads SOFTHSM2_CONF once per initialisation, so one process serves the
// tokens of one SoftHSM directory at a time.
var ErrSoftHSMInUse = errors.New("hsm: softhsm2 module already in use with another configuration")

// ErrInvalidLabel is returned by SoftHSM for a token label and by OpenKeys for a key
// label prefix that cannot be used (empty, too long, control characters).
var ErrInvalidLabel = errors.New("hsm: invalid label")

// ErrClosed is returned by the methods of a closed Keys and by Sign of its keys.
var ErrClosed = errors.New("hsm: keys closed")

// ErrDestroyed is returned by Sign of a key that Destroy deleted.
var ErrDestroyed = errors.New("hsm: key destroyed")

// ErrUnknownKey is returned by Destroy for a signer that this Keys did not make.
var ErrUnknownKey = errors.New("hsm: key not made by this key store")

// ErrKeyNotFound is returned by Open for a reference that names no key of the store in
// the token: destroyed, never made there, or of another store.
var ErrKeyNotFound = errors.New("hsm: key not found")

// ErrKeyRefused is returned by Open for an object found under the reference that is
// not a key as NewKey makes them (another curve, or extractable or not sensitive now or
// ever): it is never used.
var ErrKeyRefused = errors.New("hsm: key refused")
