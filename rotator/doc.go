// Package rotator owns the lifecycle of one SPIFFE identity's X509-SVIDs and their keys:
// enrolment; renewal on schedule, on usage (a number of handshakes signed with one key)
// and on request (operator, compromise, configuration change, fleet command, a
// rotation of the CA's anchors), with
// capped, jittered backoff; validation of every answer from the CA; hot swap through
// one immutable snapshot; the overlap in which a superseded SVID remains the credential
// of the connections it authenticated; draining those connections when the overlap
// ends and then destroying the key; and dropping SVIDs that a deny-list revokes.
//
// Every key has a version (1, 2, ... in the order this Rotator made them) and a state
// after NIST SP 800-57: pre-activation → active → overlap → destroyed, or compromised
// (revoked, or declared compromised) and then destroyed without a drain grace. Each
// transition is an audit.KeyState record with its cause and an Info log line. States are
// audit.KeyPhase values (the State constants); a rotation's Trigger and a transition's Cause
// are typed too, so that switches over them are checked for exhaustiveness.
//
// It does not talk to a CA itself (it calls an Issuer that the caller supplies), does not
// open listeners or close connections (Config.Drain does), and never persists private
// keys: a KeyStore makes and destroys them (MemoryKeys by default, whose documentation
// says what overwriting a key in Go memory can and cannot guarantee; or a PKCS#11
// token). With Config.StateFile and a key store whose keys outlive the process, it keeps
// the current SVID's public chain and the reference of its key in a file, so that a
// restarted process presents that SVID at once and renews it instead of enrolling again
// with a bootstrap token. A Rotator is the x509svid.Source and x509bundle.Source of the
// proxy: readers never block and never see a half-updated state.
package rotator
