package main

import (
	"bytes"
	"errors"
	"fmt"
	"regexp"
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

// yamlDoc is a parsed YAML file that can point at the line of any field.
type yamlDoc struct {
	file string
	root *yaml.Node
}

var yamlLineErr = regexp.MustCompile(`line (\d+): (.*)`)

// decodeYAML strictly decodes data into out (unknown fields are errors) and keeps the
// node tree for locating fields that fail validation later.
func decodeYAML(file string, data []byte, out any) (*yamlDoc, error) {
	doc := &yamlDoc{file: file, root: &yaml.Node{}}
	if err := yaml.Unmarshal(data, doc.root); err != nil {
		return nil, yamlError(file, err)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, &FileError{File: file, Err: errors.New("empty file")}
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(out); err != nil {
		return nil, yamlError(file, err)
	}
	return doc, nil
}

// yamlError turns yaml.v3's "line N: ..." messages into a FileError.
func yamlError(file string, err error) error {
	var te *yaml.TypeError
	msg := err.Error()
	if errors.As(err, &te) && len(te.Errors) > 0 {
		msg = te.Errors[0]
	}
	if m := yamlLineErr.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		return &FileError{File: file, Line: line, Err: errors.New(m[2])}
	}
	return &FileError{File: file, Err: err}
}

// fieldError reports err against the field at path (e.g. "routes[0].peer_id"), with
// the line where the field, or the nearest enclosing one that exists, is written (0 when
// even the top-level field is missing).
func (d *yamlDoc) fieldError(path string, err error) error {
	return &FileError{File: d.file, Line: d.line(path), Field: path, Err: err}
}

func (d *yamlDoc) line(path string) int { return policy.YAMLLine(d.root, path) }
