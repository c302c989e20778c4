package ca_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"fmt"
	"log"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/ca"
	"github.com/agentmesh/agentmesh/meshclient"
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
