package siem

import (
	"encoding/json"
)

// Rule matches records by type and result; an empty field matches any value, so
// {type: connection} is every connection record and {type: connection, result: ok} only
// those whose "result" is "ok".
type Rule struct {
	Type   string `yaml:"type"`
	Result string `yaml:"result"`
}

// Filter chooses the records sent. A record is sent when Include is empty or one of its
// rules matches, and no rule of Exclude matches. A record left out is still in the log
// (and its Merkle tree); the cursor moves past it.
type Filter struct {
	Include []Rule
	Exclude []Rule
}

// needsResult reports whether any rule looks at the result, which costs decoding the line.
func (f Filter) needsResult() bool {
	for _, rules := range [][]Rule{f.Include, f.Exclude} {
		for _, r := range rules {
			if r.Result != "" {
				return true
			}
		}
	}
	return false
}

func (f Filter) empty() bool { return len(f.Include) == 0 && len(f.Exclude) == 0 }

// pass decides one record of type kind whose "result" field is result ("" when absent or
// not decoded).
func (f Filter) pass(kind, result string) bool {
	if len(f.Include) > 0 && !anyMatch(f.Include, kind, result) {
		return false
	}
	return !anyMatch(f.Exclude, kind, result)
}

func anyMatch(rules []Rule, kind, result string) bool {
	for _, r := range rules {
		if (r.Type == "" || r.Type == kind) && (r.Result == "" || r.Result == result) {
			return true
		}
	}
	return false
}

// resultOf is the "result" field of a record line, "" when it has none. Only a string
// value counts; a line that is not a JSON object has no result.
func resultOf(line []byte) string {
	var v struct {
		Result json.RawMessage `json:"result"`
	}
	if json.Unmarshal(line, &v) != nil {
		return ""
	}
	var s string
	if json.Unmarshal(v.Result, &s) != nil {
		return ""
	}
	return s
}
