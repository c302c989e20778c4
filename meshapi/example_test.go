package meshapi_test

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/agentmesh/agentmesh/meshapi"
)

// The rotator tells refusals, after which only a new enrolment helps, from outages.
func ExampleResponseError_Permanent() {
	for _, status := range []int{http.StatusUnauthorized, http.StatusTooManyRequests, http.StatusServiceUnavailable} {
		err := fmt.Errorf("renew: %w", &meshapi.ResponseError{Op: "rekey", Status: status})
		var p interface{ Permanent() bool }
		fmt.Println(status, errors.As(err, &p) && p.Permanent())
	}
	// Output:
	// 401 true
	// 429 false
	// 503 false
}
