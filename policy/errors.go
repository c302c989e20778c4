package policy

import "fmt"

// FieldError names the policy field that holds an invalid value, so the command layer
// can point the operator at the file and line it came from.
type FieldError struct {
	Field  string // dotted path in the config, e.g. "rotation.renew_fraction"
	Reason string
}

func (e *FieldError) Error() string { return fmt.Sprintf("policy: %s: %s", e.Field, e.Reason) }
