package authority

import (
	"errors"

	"github.com/agentmesh/agentmesh/hsm"
	"github.com/agentmesh/agentmesh/meshapi"
)

// The errors keep package ca's "ca: " prefix: ca returns them unchanged, under the same
// names.

// ErrInvalidConfig is returned by Open for a lifetime step-ca refuses.
var ErrInvalidConfig = errors.New("ca: invalid configuration")

// ErrTrustDomainMismatch is returned by Open when the state directory holds a root for
// another trust domain than Config.TrustDomain.
var ErrTrustDomainMismatch = errors.New("ca: state directory belongs to another trust domain")

// ErrHSM wraps every failure to reach or use the PKCS#11 token. It is hsm.ErrToken.
var ErrHSM = hsm.ErrToken

// ErrInvalidID is returned by Token and CheckIssuable for a SPIFFE ID outside the trust
// domain, without a path, or longer than a SPIFFE ID may be.
var ErrInvalidID = meshapi.ErrInvalidID

// ErrGenerationState is returned by the operations on generations that the held
// generations do not allow: Activate with none prepared, Prepare while the previous
// generation is not destroyed or with another kind than the one prepared, Probe of a
// generation not held.
var ErrGenerationState = errors.New("ca: generations do not allow this operation")
