package node

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// TestAuditCheckpointSettings: the checkpoint settings reach the audit log's
// configuration with the host's origin; absent, they are zeros (the log's defaults).
func TestAuditCheckpointSettings(t *testing.T) {
	t.Parallel()
	c, err := LoadConfig(writeConfig(t, strings.Replace(goodConfig, "state: state",
		"state: state\naudit:\n  checkpoint_records: 50\n  checkpoint_interval: 2s\n  max_file_bytes: 1048576", 1)))
	if err != nil {
		t.Fatal(err)
	}
	got := c.auditConfig(nil, nil)
	if got.CheckpointRecords != 50 || got.CheckpointInterval != 2*time.Second || got.MaxFileBytes != 1<<20 ||
		got.Origin != "example.org/host/a/audit" || got.Path != c.Audit.Path {
		t.Errorf("audit config = %+v", got)
	}
	c, err = LoadConfig(writeConfig(t, goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.auditConfig(nil, nil); got.CheckpointRecords != 0 || got.CheckpointInterval != 0 || got.MaxFileBytes != 0 {
		t.Errorf("audit config without settings = %+v, want zeros", got)
	}
}

// TestAuditCheckpointSettingsErrors: each bad value is refused naming the file, the
// line and the field.
func TestAuditCheckpointSettingsErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, setting, field string
	}{
		{name: "negative records", setting: "checkpoint_records: -1", field: "audit.checkpoint_records"},
		{name: "negative interval", setting: "checkpoint_interval: -1s", field: "audit.checkpoint_interval"},
		{name: "interval too short", setting: "checkpoint_interval: 10ms", field: "audit.checkpoint_interval"},
		{name: "file too small", setting: "max_file_bytes: 1000", field: "audit.max_file_bytes"},
		{name: "negative file size", setting: "max_file_bytes: -1", field: "audit.max_file_bytes"},
		{name: "interval not a duration", setting: "checkpoint_interval: soon"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := writeConfig(t, strings.Replace(goodConfig, "state: state", "state: state\naudit:\n  "+tc.setting, 1))
			_, err := LoadConfig(path)
			var fe *FileError
			if !errors.As(err, &fe) {
				t.Fatalf("err = %v, want *FileError", err)
			}
			if fe.File != path || fe.Line != 4 || fe.Field != tc.field {
				t.Fatalf("error at %s:%d field %q, want line 4 field %q (%v)", fe.File, fe.Line, fe.Field, tc.field, err)
			}
		})
	}
}
