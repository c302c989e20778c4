package redirect

import (
	"bytes"
	"os"
	"os/exec"
)

// procIfInet6 lists the IPv6 addresses of the network namespace the process runs in;
// it is absent or empty when the kernel has IPv6 off.
const procIfInet6 = "/proc/net/if_inet6"

// HostHasIPv6 reports whether IPv6 capture can and should be programmed in the network
// namespace the process runs in: the kernel has IPv6 (at least one interface address,
// ::1 included) and ip6tables-save and ip6tables-restore are installed. `agentmesh
// redirect install` uses it as the default of Config.IPv6, so that agents' IPv6 is not
// left uncaptured on a host that has it. It reads this process's namespace only: with
// a Config.Command that enters another namespace, decide IPv6 for that one.
func HostHasIPv6() bool {
	data, err := os.ReadFile(procIfInet6)
	if err != nil || len(bytes.TrimSpace(data)) == 0 {
		return false
	}
	for _, tool := range []string{toolsV6.save, toolsV6.restore} {
		if _, err := exec.LookPath(tool); err != nil {
			return false
		}
	}
	return true
}
