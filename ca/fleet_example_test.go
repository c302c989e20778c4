package ca_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log"

	"github.com/agentmesh/agentmesh/ca"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"
)

// An operator asks every proxy to rotate its credential, on the CA host (what
// `agentmesh rotate --all --reason R` does); each proxy's Watch hands the request
// to its rotator. (Not run as a test: it needs a running CA; fleet_test.go does the
// same.)
func ExampleRequestFleetRotation() {
	fr, err := ca.RequestFleetRotation(context.Background(), "/var/lib/agentmesh-ca", "quarterly key rotation")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("fleet rotation", fr.ID, "requested at", fr.At)

	// On each proxy:
	var current *tls.Certificate // the rotator's SVID
	var roots []*x509.Certificate
	rotate := make(chan meshapi.FleetRotation, 1)
	_, err = meshclient.NewWatch(meshclient.Config{
		URL:         "https://ca.mesh.internal:9443",
		Roots:       roots,
		Certificate: func() (*tls.Certificate, error) { return current, nil },
		// Called from the watch loop: hand the rotation over and return.
		OnFleetRotation: func(fr meshapi.FleetRotation) {
			select {
			case rotate <- fr:
			default: // one is pending already
			}
		},
	})
	if err != nil {
		log.Fatal(err)
	}
}
