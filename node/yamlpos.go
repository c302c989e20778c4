package node

import (
	"errors"
	"fmt"
	"os"
	"strconv"

	"go.yaml.in/yaml/v3"

	"github.com/agentmesh/agentmesh/policy"
)

// FileError locates a bad value in a configuration file by file, line and field, so an
// operator can fix it without guessing.
type FileError struct {
	File  string
	Line  int    // 0 when unknown (the field is missing)
	Field string // dotted path, e.g. "routes[0].peer_id"
	Err   error
}

func (e *FileError) Error() string {
	loc := e.File
	if e.Line > 0 {
		loc += ":" + strconv.Itoa(e.Line)
	}
	if e.Field == "" {
		return fmt.Sprintf("%s: %v", loc, e.Err)
	}
	return fmt.Sprintf("%s: %s: %v", loc, e.Field, e.Err)
}

func (e *FileError) Unwrap() error { return e.Err }

// fileError places policy's file-independent error in file.
func fileError(file string, err error) error {
	var fe *policy.FieldError
	if errors.As(err, &fe) {
		return &FileError{File: file, Line: fe.Line, Field: fe.Field, Err: errors.New(fe.Reason)}
	}
	return &FileError{File: file, Err: err}
}

// yamlDoc is a parsed YAML file that can point at the line of any field.
type yamlDoc struct {
	file string
	root *yaml.Node
}

// decodeYAML strictly decodes data into out (policy.DecodeYAML: unknown fields are
// errors) and keeps the node tree for locating fields that fail validation later.
func decodeYAML(file string, data []byte, out any) (*yamlDoc, error) {
	root, err := policy.DecodeYAML(data, out, "empty file")
	if err != nil {
		return nil, fileError(file, err)
	}
	return &yamlDoc{file: file, root: root}, nil
}

// fieldError reports err against the field at path (e.g. "routes[0].peer_id"), with
// the line where the field, or the nearest enclosing one that exists, is written (0 when
// even the top-level field is missing).
func (d *yamlDoc) fieldError(path string, err error) error {
	return &FileError{File: d.file, Line: policy.YAMLLine(d.root, path), Field: path, Err: err}
}

// LoadPolicy reads and parses an authorization policy; errors name the file, line and
// field.
func LoadPolicy(path string) (*policy.Authz, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("policy: %w", err)
	}
	a, err := policy.ParseAuthz(data)
	if fe := (*policy.FieldError)(nil); errors.As(err, &fe) {
		return nil, fileError(path, err)
	}
	return a, err
}
