// Package policy owns the decisions an operator writes down: how identities rotate
// (lifetime fractions, jitter, overlap, drain grace, retry bounds, the usage trigger,
// the session-ticket key period) and who may reach what (Authz: inbound and outbound
// rules over SPIFFE IDs, default deny).
//
// It is pure: no I/O, no clocks, no goroutines. Rotation values come in already decoded
// (the command layer reports file, line and field); the authorization policy is parsed
// here from bytes the caller read, so its errors carry line and field and the caller
// only adds the file name. This package supplies defaults and validation so every
// consumer applies the same rules.
package policy
