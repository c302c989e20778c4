package ca_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/ca"
	"github.com/agentmesh/agentmesh/meshapi"
)

// An operator revokes an identity through the admin socket of the CA running with
// that state directory (what `agentmesh revoke` does). (Not run as a test: it needs a
// running CA; revoke_test.go does the same.)
func ExampleRequestRevoke() {
	res, err := ca.RequestRevoke(context.Background(), "/var/lib/agentmesh-ca", meshapi.RevokeRequest{
		SPIFFEID: "spiffe://example.org/host/web-3",
		Reason:   "host decommissioned",
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("deny-list version", res.ListVersion, "revokes serials", res.Serials)
}

// A holder of deny-lists accepts only a newer list that keeps every entry it holds.
func ExampleNextDenyList() {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	at := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	web3 := meshapi.DeniedID{SPIFFEID: spiffeid.RequireFromPath(td, "/host/web-3"), RevokedAt: at, Version: 2}
	v1 := &meshapi.DenyList{TrustDomain: td.Name(), Version: 1, IssuedAt: at}
	v2 := &meshapi.DenyList{TrustDomain: td.Name(), Version: 2, IssuedAt: at, IDs: []meshapi.DeniedID{web3}}
	v3 := &meshapi.DenyList{TrustDomain: td.Name(), Version: 3, IssuedAt: at} // web-3 dropped

	for _, step := range []struct {
		name      string
		held, got *meshapi.DenyList
	}{{"v1 -> v2", v1, v2}, {"v2 -> v2", v2, v2}, {"v2 -> v1", v2, v1}, {"v2 -> v3", v2, v3}} {
		replace, err := meshapi.NextDenyList(step.held, step.got, time.Now())
		fmt.Println(step.name, replace, errors.Is(err, meshapi.ErrDenyListStale), errors.Is(err, meshapi.ErrDenyListGap))
	}
	fmt.Println("denied:", v2.Denies(web3.SPIFFEID, "1234", time.Time{}))
	// Output:
	// v1 -> v2 true false false
	// v2 -> v2 false false false
	// v2 -> v1 false true false
	// v2 -> v3 false false true
	// denied: true
}
