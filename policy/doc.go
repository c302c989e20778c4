// Package policy owns the decisions an operator writes down: how identities rotate
// (lifetime fractions, jitter, overlap, drain grace, retry bounds, the usage trigger,
// the session-ticket key period) and, later, who may reach what.
//
// It is pure: no I/O, no clocks, no goroutines. Values come in already parsed (the
// command layer turns files into these structs and reports file, line and field);
// this package supplies defaults and validation so every consumer applies the same rules.
package policy
