package ca_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log"
	"net/http"
	"net/netip"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/ca"
)

// A CA in a state directory, and a workload enrolling with a bootstrap token. (Not run
// as a test: it needs SoftHSM2; ca_test.go does the same.)
func Example() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	td := spiffeid.RequireTrustDomainFromString("example.org")
	srv, err := ca.New(ctx, ca.Config{StateDir: "/var/lib/agentmesh-ca", TrustDomain: td, Listen: "127.0.0.1:0"})
	if err != nil {
		log.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()

	id := spiffeid.RequireFromPath(td, "/agent/web")
	client, err := meshclient.NewClient(meshclient.ClientConfig{
		URL:   srv.URL(),
		Roots: srv.Roots(),
		Token: func(context.Context) (string, error) { return srv.Token(id) },
	})
	if err != nil {
		log.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	chain, err := client.Enroll(ctx, id, key)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(chain[0].URIs[0])

	cancel()
	if err := <-done; err != nil {
		log.Fatal(err)
	}
}

// A proxy's directory client: registered and watching while Run runs, it tells the
// proxy which peer lives at a destination address. (Not run as a test: it needs a CA;
// mesh_test.go does the same.)
func ExampleNewDirectory() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	var current atomic.Pointer[tls.Certificate] // kept up to date by the rotator
	var roots []*x509.Certificate               // the CA's root, from the state directory
	dir, err := ca.NewDirectory(ca.DirectoryConfig{
		URL:         "https://ca.mesh.internal:9443",
		Roots:       roots,
		Certificate: func() (*tls.Certificate, error) { return current.Load(), nil },
		Addresses:   []netip.Addr{netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("fd00::2")},
		TunnelPort:  15008,
	})
	if err != nil {
		log.Fatal(err)
	}
	go func() { _ = dir.Run(ctx) }()

	<-dir.Updated() // the first directory arrived
	if id, tunnel, ok := dir.PeerFor(netip.MustParseAddr("10.0.0.3")); ok {
		fmt.Println("tunnel to", id, "at", tunnel)
	}
}

// The rotator tells refusals, after which only a new enrolment helps, from outages.
func ExampleResponseError_Permanent() {
	for _, status := range []int{http.StatusUnauthorized, http.StatusTooManyRequests, http.StatusServiceUnavailable} {
		var err error = fmt.Errorf("renew: %w", &meshapi.ResponseError{Op: "rekey", Status: status})
		var p interface{ Permanent() bool }
		fmt.Println(status, errors.As(err, &p) && p.Permanent())
	}
	// Output:
	// 401 true
	// 429 false
	// 503 false
}
