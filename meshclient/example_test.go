package meshclient_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log"
	"net/netip"
	"sync/atomic"

	"github.com/agentmesh/agentmesh/meshclient"
)

// What a proxy runs to take part in the mesh: registered and watching while Run runs,
// its Watch tells the proxy which peer lives at a destination address. (Not run as a test: it needs a CA;
// ca/mesh_test.go does the same.)
func ExampleNewMember() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var current atomic.Pointer[tls.Certificate] // kept up to date by the rotator
	var roots []*x509.Certificate               // the CA's root, from the state directory
	m, err := meshclient.NewMember(meshclient.Config{
		URL:         "https://ca.mesh.internal:9443",
		Roots:       roots,
		Certificate: func() (*tls.Certificate, error) { return current.Load(), nil },
		Addresses:   []netip.Addr{netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("fd00::2")},
		TunnelPort:  15008,
	})
	if err != nil {
		log.Fatal(err)
	}
	go func() { _ = m.Run(ctx) }()

	<-m.Watch.Updated() // the first directory arrived
	if id, tunnel, ok := m.Watch.State().PeerFor(netip.MustParseAddr("10.0.0.3")); ok {
		fmt.Println("tunnel to", id, "at", tunnel)
	}
}
