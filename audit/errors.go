package audit

import (
	"errors"
	"fmt"
)

// ErrUnavailable is returned by Append, Sync and Err once the log cannot take more records:
// a write or fsync failed (the cause is wrapped too, so errors.Is works for both) or Run has
// returned. Callers that must not act without an audit trail (the proxy accepting a
// handshake) treat it as "refuse".
var ErrUnavailable = errors.New("audit: log unavailable")

// ErrInvalidEvent is returned by Append for an event that cannot be recorded: nil, a Kind that
// is not a short lowercase identifier, a value that does not marshal to a JSON object, a
// field that collides with a record header ("seq", "time", "type", "prev", "hash"), or a
// record larger than the 1 MiB line limit. Nothing is enqueued; the log stays healthy.
var ErrInvalidEvent = errors.New("audit: invalid event")

// ErrCorrupt is returned by Open when the last complete line of an existing file is not a
// valid record, so the chain cannot be continued. Run Verify on the file and move it aside.
var ErrCorrupt = errors.New("audit: existing log is corrupt")

// VerifyError names the first record that breaks the chain. Records before it are intact.
type VerifyError struct {
	// Seq is the sequence number the record at Line should carry (the last good seq + 1);
	// the value written in the line itself is untrusted and is quoted in Reason instead.
	Seq uint64
	// Line is the 1-based line number in the verified stream.
	Line int
	// Reason says what is wrong, for an operator.
	Reason string
}

func (e *VerifyError) Error() string {
	return fmt.Sprintf("audit: verify: line %d (seq %d): %s", e.Line, e.Seq, e.Reason)
}
