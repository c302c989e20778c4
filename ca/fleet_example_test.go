package ca_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log"
	"time"

	"github.com/agentmesh/agentmesh/ca"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"
)

// An operator asks every proxy to rotate its credential, on the CA host (what
// `agentmesh rotate --all --reason R` does); each proxy's Watch publishes it in its
// mesh state, and the proxy rotates. (Not run as a test: it needs a running CA; fleet_test.go does the
// same.)
func ExampleRequestFleetRotation() {
	fr, err := ca.RequestFleetRotation(context.Background(), "/var/lib/agentmesh-ca", "quarterly key rotation")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("fleet rotation", fr.ID, "requested at", fr.At)

	// On each proxy: the rotation arrives in a mesh state; it is due once per ID, when
	// requested after the proxy started.
	var current *tls.Certificate // the rotator's SVID
	var roots []*x509.Certificate
	started := time.Now()
	w, err := meshclient.NewWatch(meshclient.Config{
		URL:         "https://ca.mesh.internal:9443",
		Roots:       roots,
		Certificate: func() (*tls.Certificate, error) { return current, nil },
	})
	if err != nil {
		log.Fatal(err)
	}
	go func() { _ = w.Run(context.Background()) }()
	var seen uint64
	for range w.Updated() {
		fr := w.State().Rotation()
		if fr == nil {
			continue
		}
		var due bool
		if seen, due = meshapi.FleetDue(seen, started, *fr); due {
			fmt.Println("rotate every identity held:", fr.Reason)
		}
	}
}
