package policy

import "strconv"

// FieldError names the policy field that holds an invalid value, so the command layer
// can point the operator at the file and line it came from.
type FieldError struct {
	// Line is the 1-based line in the parsed document where the field (or the nearest
	// enclosing one that exists) is written; 0 when unknown, e.g. for a Rotation
	// validated from an already-decoded struct.
	Line   int
	Field  string // dotted path in the config, e.g. "rotation.renew_fraction" or "inbound[2].from[0]"; "" for a document-level error
	Reason string
}

func (e *FieldError) Error() string {
	msg := "policy: "
	if e.Line > 0 {
		msg += "line " + strconv.Itoa(e.Line) + ": "
	}
	if e.Field != "" {
		msg += e.Field + ": "
	}
	return msg + e.Reason
}
