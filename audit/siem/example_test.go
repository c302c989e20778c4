package siem_test

import (
	"fmt"

	"github.com/agentmesh/agentmesh/audit/siem"
)

// Settings as a proxy's audit.siem section holds them: every record but the handshakes
// that succeeded and the per-connection records.
func ExampleSettings_Validate() {
	s := siem.Settings{Address: "siem.example.org:6514", CAFile: "/etc/agentmesh/siem-ca.pem",
		Exclude: []siem.Rule{{Type: "handshake", Result: "ok"}, {Type: "connection"}}}
	fmt.Println(s.Validate())
	s.Address = "siem.example.org"
	fmt.Println(s.Validate())
	// Output:
	// <nil>
	// siem: address: must be host:port
}
