package proxy

import "github.com/agentmesh/agentmesh/audit"

// Auditor records audit events; *audit.Log satisfies it.
type Auditor interface {
	// Append records e. It may block while the log's queue is full and
	// fails once the log is unusable. Called concurrently.
	Append(audit.Event) error
	// Err is nil while the log is healthy; otherwise new handshakes are
	// refused.
	Err() error
}
