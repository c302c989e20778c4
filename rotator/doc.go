// Package rotator owns the lifecycle of one SPIFFE identity's X509-SVID: enrolment,
// renewal on schedule with capped, jittered backoff, validation of every answer from the
// CA, hot swap through one immutable snapshot, and the overlap in which a superseded SVID
// remains known until it ends.
//
// It does not talk to a CA itself (it calls an Issuer that the caller supplies), does not
// open listeners, and never persists private keys. A Rotator is the x509svid.Source and
// x509bundle.Source of the proxy: readers never block and never see a half-updated state.
package rotator
