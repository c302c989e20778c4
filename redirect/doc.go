// Package redirect owns the kernel's packet-capture rules for agentmesh: the iptables nat
// rules that send agents' TCP connections to the local proxy, as Istio's istio-iptables
// does. It computes them from a Config (Rules, pure), installs them (Install) and removes
// exactly them (Remove). It never reads, accepts or forwards traffic, never learns the
// original destination (the proxy does, with SO_ORIGINAL_DST), and does not load kernel
// modules, pick the iptables backend (legacy or nft) or persist rules across reboots.
//
// # Rules
//
// Everything lives in the nat table, in two chains of agentmesh's own:
//
//	-A OUTPUT -p tcp -j AGENTMESH_OUTPUT
//	-A AGENTMESH_OUTPUT -m owner --uid-owner <ExcludeUIDs> -j RETURN     the proxy's own uid
//	-A AGENTMESH_OUTPUT -m mark --mark <ExcludeMark> -j RETURN           the proxy's SO_MARK
//	-A AGENTMESH_OUTPUT -d 127.0.0.0/8 -j RETURN                         (::1/128 for IPv6)
//	-A AGENTMESH_OUTPUT -d <ExcludeCIDRs> -j RETURN
//	-A AGENTMESH_OUTPUT -p tcp -m tcp --dport <ExcludePorts> -j RETURN
//	-A AGENTMESH_OUTPUT [-d <IncludeCIDRs>] -p tcp [-m tcp --dport <IncludePorts>] -j REDIRECT --to-ports <OutboundPort>
//
// and, in strict mode (StrictPorts not empty):
//
//	-A PREROUTING -p tcp -j AGENTMESH_INBOUND
//	-A AGENTMESH_INBOUND -p tcp -m tcp --dport <StrictPorts> -j REDIRECT --to-ports <InboundPort>
//
// The exclusions come first so nothing can capture the proxy's own connections (which
// would loop); Rules refuses a Config that excludes neither a uid nor a mark. A connection
// that matches no REDIRECT falls off the end of the chain and is left alone. NAT rules see
// only the first packet of a connection, so installing or removing rules never breaks a
// connection already established.
//
// Strict mode covers traffic arriving from other hosts (nat PREROUTING). A process on the
// same host connecting to an agent never passes PREROUTING: over loopback it is not
// captured at all, and to a non-loopback local address the outbound chain captures it.
//
// # Applying
//
// Install and Remove read the nat table with iptables-save -t nat and change it with a
// single iptables-restore --noflush per family, so each family's change is atomic and
// rules of other software are never flushed or reordered. Reinstalling is idempotent and
// switches from the old rules to the new ones with no moment without capture. Remove
// deletes the two chains and every rule that jumps into them, and nothing else: after it,
// iptables-save prints what it printed before Install. (One nuance with the nft backend: if
// the host had no nat table at all, the one Install created stays, with empty built-in
// chains and ACCEPT policies, which is the same as having none.)
//
// The two chains belong to agentmesh wholesale: rules added to them by hand, and any rule
// elsewhere that jumps into them, are replaced or deleted by the next Install or Remove.
//
// The tools run through Config.Command (default exec.CommandContext), so the same code
// programs another network namespace by prefixing "ip netns exec NAME"; the tests use that
// to work in throwaway namespaces and never touch the host's rules.
package redirect
