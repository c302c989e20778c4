package ca

import (
	"fmt"
	"time"

	"github.com/agentmesh/agentmesh/audit"
)

// Bounds of AuditLogSettings: a shorter interval only costs signatures, a smaller file
// only segments.
const (
	minCheckpointInterval = 100 * time.Millisecond
	minAuditFileBytes     = 64 << 10
)

// AuditLogSettings tunes the CA's own audit log (ProcessConfig.AuditLog): the fields of
// audit.Config it passes on. Zero values take the log's defaults.
type AuditLogSettings struct {
	// CheckpointRecords and CheckpointInterval are how often the log signs a
	// checkpoint: every so many records or so long, whichever comes first, while it
	// grows. Default 1000 and 10s; the interval is at least 100ms.
	CheckpointRecords  int
	CheckpointInterval time.Duration
	// MaxFileBytes is the size past which the active file becomes a segment. Default
	// 64 MiB; at least 64 KiB.
	MaxFileBytes int64
}

func (s AuditLogSettings) validate() error {
	switch {
	case s.CheckpointRecords < 0:
		return fmt.Errorf("%w: audit CheckpointRecords %d is negative", ErrInvalidConfig, s.CheckpointRecords)
	case s.CheckpointInterval != 0 && s.CheckpointInterval < minCheckpointInterval:
		return fmt.Errorf("%w: audit CheckpointInterval %v is neither 0 (10s) nor at least %v", ErrInvalidConfig,
			s.CheckpointInterval, minCheckpointInterval)
	case s.MaxFileBytes != 0 && s.MaxFileBytes < minAuditFileBytes:
		return fmt.Errorf("%w: audit MaxFileBytes %d is neither 0 (64 MiB) nor at least %d", ErrInvalidConfig,
			s.MaxFileBytes, minAuditFileBytes)
	}
	return nil
}

// apply sets the settings in c.
func (s AuditLogSettings) apply(c audit.Config) audit.Config {
	c.CheckpointRecords, c.CheckpointInterval, c.MaxFileBytes = s.CheckpointRecords, s.CheckpointInterval, s.MaxFileBytes
	return c
}
