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

// VerifyError names the first record that breaks the chain, or, for VerifyLog, the first
// record that differs from what a checkpoint or the witness committed to. Records before
// it are intact.
type VerifyError struct {
	// File is the file holding the record (a segment or the active file); empty for
	// Verify and for a record the files no longer hold.
	File string
	// Seq is the sequence number the bad record should carry (the last good seq + 1; its
	// leaf index in the tree is Seq-1); the value written in the line itself is untrusted
	// and is quoted in Reason instead.
	Seq uint64
	// Line is the 1-based line number in File (or in the verified stream); 0 when the
	// problem is not one line's (a rewritten range, a cut tail).
	Line int
	// Reason says what is wrong, for an operator.
	Reason string
}

func (e *VerifyError) Error() string {
	at := fmt.Sprintf("index %d (seq %d)", e.Seq-1, e.Seq)
	if e.Line > 0 {
		at = fmt.Sprintf("line %d (seq %d)", e.Line, e.Seq)
	}
	if e.File != "" {
		at = e.File + ": " + at
	}
	return fmt.Sprintf("audit: verify: %s: %s", at, e.Reason)
}
