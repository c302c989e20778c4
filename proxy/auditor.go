package proxy

import (
	"context"

	"github.com/agentmesh/agentmesh/audit"
)

// AuditLog records audit events; *audit.Log satisfies it.
type AuditLog interface {
	// Append records e. It may block while the log's queue is full and
	// fails once the log is unusable. Called concurrently.
	Append(audit.Event) error
	// Sync returns nil once every record appended before it is durable
	// (written and fsynced), and an error if that failed or ctx ended
	// first. The proxy calls it before a connection carries traffic, unless
	// Config.AuditAck is AuditAckQueued. Called concurrently.
	Sync(ctx context.Context) error
	// Err is nil while the log is healthy; otherwise new handshakes are
	// refused.
	Err() error
}

// AuditAck says when the record of a new connection counts as written
// (Config.AuditAck).
type AuditAck string

const (
	// AuditAckDurable (the default) serves a connection only once its
	// handshake record is durable (Auditor.Sync): no connection a crash or
	// a full disk could leave unrecorded carries traffic.
	AuditAckDurable AuditAck = "durable"
	// AuditAckQueued serves a connection once its record is queued for the
	// writer: cheaper, but a crash may lose the records of the last
	// connections. For measuring what durability costs.
	AuditAckQueued AuditAck = "queued"
)
