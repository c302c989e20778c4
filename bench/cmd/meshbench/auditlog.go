package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/agentmesh/agentmesh/audit"
)

// auditSummary is what a proxy's audit log held once the proxy stopped.
type auditSummary struct {
	// handshakes are the inbound tunnel handshakes it accepted, resumed those of them
	// that resumed a TLS session.
	handshakes, resumed int
	// records is the size of the log (its Merkle tree); signed and witnessed are the
	// tree sizes of the latest checkpoint the proxy signed and of the latest the CA
	// cosigned (0: none).
	records, signed, witnessed uint64
}

// auditLog reads the proxy's audit log, across its segments, and its checkpoints. Read
// it once the proxy has stopped, so every record is on disk.
func (p *meshProxy) auditLog() (auditSummary, error) {
	var s auditSummary
	path := filepath.Join(p.state, "audit.log")
	err := audit.Scan(path, 1, func(seq uint64, line []byte) error {
		s.records = seq
		if !bytes.Contains(line, []byte(`"type":"handshake"`)) {
			return nil
		}
		var rec struct {
			Direction, Result string
			Resumed           bool
		}
		if err := json.Unmarshal(line, &rec); err != nil {
			return fmt.Errorf("audit log %s: record %d: %w", path, seq, err)
		}
		if rec.Direction == "inbound" && rec.Result == "ok" {
			s.handshakes++
			if rec.Resumed {
				s.resumed++
			}
		}
		return nil
	})
	if err != nil {
		return s, err
	}
	if s.signed, err = checkpointSize(path + ".checkpoint"); err != nil {
		return s, err
	}
	s.witnessed, err = checkpointSize(path + ".cosigned")
	return s, err
}

// checkpointSize is the tree size of the signed checkpoint note in file, 0 when there
// is none. The signatures are not checked: `agentmesh audit verify` does that.
func checkpointSize(file string) (uint64, error) {
	b, err := os.ReadFile(file)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	// A signed note is its text, a blank line, then the signature lines.
	text, _, ok := strings.Cut(string(b), "\n\n")
	if !ok {
		return 0, fmt.Errorf("%s: not a signed note", file)
	}
	c, err := audit.ParseCheckpoint(text + "\n")
	if err != nil {
		return 0, fmt.Errorf("%s: %w", file, err)
	}
	return c.Size, nil
}
