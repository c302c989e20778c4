package meshapi

import (
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/testmesh"
)

var testTD = testmesh.TD

var addrs = testmesh.Addrs

var idA = spiffeid.RequireFromPath(testTD, "/host/a")
