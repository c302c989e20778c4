package policy_test

import (
	"fmt"

	"github.com/agentmesh/agentmesh/policy"
)

func ExampleRotation_Validate() {
	err := policy.Rotation{RenewFraction: 0.95}.Validate()
	fmt.Println(err)
	// Output: policy: renew_fraction: must be in (0, 0.9]
}
