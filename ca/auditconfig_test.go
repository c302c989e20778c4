package ca

import (
	"errors"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/audit"
)

func TestAuditLogSettings(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		s    AuditLogSettings
		ok   bool
	}{
		{name: "defaults", ok: true},
		{name: "set", s: AuditLogSettings{CheckpointRecords: 10, CheckpointInterval: time.Second, MaxFileBytes: 1 << 20}, ok: true},
		{name: "negative records", s: AuditLogSettings{CheckpointRecords: -1}},
		{name: "interval too short", s: AuditLogSettings{CheckpointInterval: time.Millisecond}},
		{name: "negative interval", s: AuditLogSettings{CheckpointInterval: -time.Second}},
		{name: "file too small", s: AuditLogSettings{MaxFileBytes: 100}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := tc.s.validate()
			if (err == nil) != tc.ok || (err != nil && !errors.Is(err, ErrInvalidConfig)) {
				t.Fatalf("validate() = %v, want ok %t", err, tc.ok)
			}
			if !tc.ok {
				return
			}
			c := tc.s.apply(audit.Config{Path: "x"})
			if c.Path != "x" || c.CheckpointRecords != tc.s.CheckpointRecords || c.CheckpointInterval != tc.s.CheckpointInterval ||
				c.MaxFileBytes != tc.s.MaxFileBytes {
				t.Errorf("apply = %+v", c)
			}
		})
	}
}
