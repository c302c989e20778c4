package testaudit

import "github.com/agentmesh/agentmesh/audit"

// Of returns the events of type E among events, in order.
func Of[E audit.Event](events []audit.Event) []E {
	var out []E
	for _, e := range events {
		if v, ok := e.(E); ok {
			out = append(out, v)
		}
	}
	return out
}
