package redirect_test

import (
	"context"
	"fmt"
	"os/exec"

	"github.com/agentmesh/agentmesh/redirect"
)

// Rules shows what Install would program, without touching the system: here the proxy runs
// as uid 1337, ssh is never captured, and port 9000 is a strict (mesh-only) agent port.
func ExampleRules() {
	plan, err := redirect.Rules(redirect.Config{
		ExcludeUIDs:  []int{1337},
		ExcludePorts: []uint16{22},
		StrictPorts:  []uint16{9000},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Print(plan.IPv4.RestoreInput())
	// Output:
	// *nat
	// :AGENTMESH_OUTPUT - [0:0]
	// :AGENTMESH_INBOUND - [0:0]
	// -A AGENTMESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
	// -A AGENTMESH_OUTPUT -d 127.0.0.0/8 -j RETURN
	// -A AGENTMESH_OUTPUT -p tcp -m tcp --dport 22 -j RETURN
	// -A AGENTMESH_OUTPUT -p tcp -j REDIRECT --to-ports 15001
	// -A AGENTMESH_INBOUND -p tcp -m tcp --dport 9000 -j REDIRECT --to-ports 15006
	// -A OUTPUT -p tcp -j AGENTMESH_OUTPUT
	// -A PREROUTING -p tcp -j AGENTMESH_INBOUND
	// COMMIT
}

// A bad Config is refused before anything runs, naming the field.
func ExampleRules_invalid() {
	_, err := redirect.Rules(redirect.Config{ExcludeUIDs: []int{1337}, IncludePorts: []uint16{80, 15001}})
	fmt.Println(err)
	// Output:
	// redirect: invalid config: IncludePorts[1]: 15001 is OutboundPort: connections to it would be redirected onto the proxy's own listener
}

// Install and Remove program the network namespace they run in; Config.Command points them
// at another one, here a namespace created with "ip netns add agents" (a pod's, in a
// Kubernetes init container the default is already the right one).
func ExampleInstall() {
	ctx := context.Background()
	cfg := redirect.Config{
		ExcludeMark: 0x539, // the proxy sets SO_MARK 0x539 on its own sockets
		IPv6:        true,
		Command: func(ctx context.Context, name string, arg ...string) *exec.Cmd {
			return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", "agents", name}, arg...)...)
		},
	}
	if err := redirect.Install(ctx, cfg); err != nil {
		fmt.Println(err) // the error carries iptables' own message
		return
	}
	// ... run the proxy; on shutdown:
	if err := redirect.Remove(ctx, cfg); err != nil {
		fmt.Println(err)
	}
}
