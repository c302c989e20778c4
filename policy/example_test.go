package policy_test

import (
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/policy"
)

func ExampleRotationPolicy_Validate() {
	err := policy.RotationPolicy{RenewFraction: 0.95}.Validate()
	fmt.Println(err)
	// Output: policy: renew_fraction: must be in (0, 0.9]
}

func ExampleParseAuthz() {
	a, err := policy.ParseAuthz([]byte(`inbound:
  - name: planner-to-search
    from: [spiffe://example.org/agent/planner]
    to:   {ports: [8080]}
`))
	if err != nil {
		fmt.Println(err)
		return
	}
	d := a.Inbound(spiffeid.RequireFromString("spiffe://example.org/agent/planner"), 8080, spiffeid.ID{})
	fmt.Println(d.Allow, d.Rule)
	d = a.Inbound(spiffeid.RequireFromString("spiffe://example.org/agent/planner2"), 8080, spiffeid.ID{})
	fmt.Println(d.Allow, d.Rule)

	_, err = policy.ParseAuthz([]byte("inbound:\n  - name: x\n    from: [spiffe://Example.org/a]\n    to: {ports: [1]}\n"))
	var fe *policy.FieldError
	if errors.As(err, &fe) {
		fmt.Println(fe.Line, fe.Field)
	}
	// Output:
	// true 0
	// false -1
	// 3 inbound[0].from[0]
}
