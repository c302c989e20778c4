package rotator_test

import (
	"fmt"
	"time"

	"github.com/agentmesh/agentmesh/policy"
	"github.com/agentmesh/agentmesh/rotator"
)

// A one-hour SVID with the default policy renews when a third of its lifetime remains,
// brought forward by a jitter draw of 0.5 times a twentieth of the lifetime.
func ExampleRenewAt() {
	notBefore := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := rotator.RenewAt(notBefore, notBefore.Add(time.Hour), policy.Rotation{}.WithDefaults(), 0.5)
	fmt.Println(at.Sub(notBefore))
	// Output: 38m30s
}
