//go:build linux

package sockowner_test

import (
	"fmt"
	"net"
	"os"

	"github.com/agentmesh/agentmesh/internal/sockowner"
)

// A server asks which local user is on the other end of a loopback connection.
func ExampleUID() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer client.Close()
	conn, err := ln.Accept()
	if err != nil {
		fmt.Println(err)
		return
	}
	defer conn.Close()

	// The client's socket has the accepted connection's addresses, swapped.
	peer := conn.RemoteAddr().(*net.TCPAddr).AddrPort()
	self := conn.LocalAddr().(*net.TCPAddr).AddrPort()
	uid, err := sockowner.UID(peer, self)
	fmt.Println(uid == uint32(os.Geteuid()), err)
	// Output: true <nil>
}
