package policy

import (
	"bytes"
	"errors"
	"io"
	"regexp"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// yamlDoc is a parsed YAML document that can point at the line of any field.
type yamlDoc struct{ root *yaml.Node }

var yamlLineErr = regexp.MustCompile(`line (\d+): (.*)`)

// decodeYAML strictly decodes a policy into out.
func decodeYAML(data []byte, out any) (*yamlDoc, error) {
	root, err := DecodeYAML(data, out, "empty policy")
	if err != nil {
		return nil, err
	}
	return &yamlDoc{root: root}, nil
}

// DecodeYAML strictly decodes one YAML document into out (unknown fields and a second
// document are errors, each a *FieldError with its line; empty, when data holds no
// document, is the reason given) and returns the node tree, so that fields failing
// validation later are located with YAMLLine. Every YAML file of the project is read
// through it, so they all report errors alike.
func DecodeYAML(data []byte, out any, empty string) (*yaml.Node, error) {
	root := &yaml.Node{}
	if err := yaml.Unmarshal(data, root); err != nil {
		return nil, yamlError(err)
	}
	if root.Kind == 0 || len(bytes.TrimSpace(data)) == 0 {
		return nil, &FieldError{Reason: empty}
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(out); err != nil {
		return nil, yamlError(err)
	}
	// A second document would be silently ignored, and rules the operator wrote
	// there (an outbound section, say) would not apply: refuse it.
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		line := extra.Line
		if err != nil {
			return nil, yamlError(err)
		}
		return nil, &FieldError{Line: line, Reason: "more than one YAML document"}
	}
	return root, nil
}

// yamlError turns yaml.v3's "line N: ..." messages into a FieldError.
func yamlError(err error) error {
	msg := err.Error()
	var te *yaml.TypeError
	if errors.As(err, &te) && len(te.Errors) > 0 {
		msg = te.Errors[0]
	}
	if m := yamlLineErr.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		return &FieldError{Line: line, Reason: m[2]}
	}
	return &FieldError{Reason: strings.TrimPrefix(msg, "yaml: ")}
}

// fieldError reports reason against the field at path (e.g. "inbound[0].from[1]"),
// with the line where the field, or the nearest enclosing one that exists, is written.
func (d *yamlDoc) fieldError(path, reason string) error {
	return &FieldError{Line: d.line(path), Field: path, Reason: reason}
}

func (d *yamlDoc) line(path string) int { return YAMLLine(d.root, path) }

// YAMLLine returns the line of the field at path (e.g. "routes[0].peer_id") in the
// document root, or of the nearest enclosing field that exists (0 when even the
// top-level field is missing), so that errors can name the line to fix.
func YAMLLine(root *yaml.Node, path string) int {
	n := root
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	line := 0 // a missing top-level field has no line to point at
	for _, seg := range strings.Split(strings.ReplaceAll(path, "[", ".["), ".") {
		if seg == "" {
			continue
		}
		next := child(n, seg)
		if next == nil {
			return line
		}
		n, line = next, next.Line
	}
	return line
}

func child(n *yaml.Node, seg string) *yaml.Node {
	if n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	if strings.HasPrefix(seg, "[") {
		i, err := strconv.Atoi(strings.Trim(seg, "[]"))
		if err != nil || n.Kind != yaml.SequenceNode || i < 0 || i >= len(n.Content) {
			return nil
		}
		return n.Content[i]
	}
	if n.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == seg {
			return n.Content[i+1]
		}
	}
	return nil
}
