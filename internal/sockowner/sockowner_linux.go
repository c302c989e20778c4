package sockowner

import (
	"errors"
	"fmt"
)

// lookup asks sock_diag and, only when that interface fails, the /proc tables: a
// socket sock_diag reports absent is absent, and scanning /proc is a thousand times
// slower.
func lookup(q query) (uint32, error) {
	uid, err := diagUID(q)
	if err == nil || errors.Is(err, ErrNotFound) {
		return uid, err
	}
	uid, perr := procUID(q)
	if perr == nil || errors.Is(perr, ErrNotFound) {
		return uid, perr
	}
	return 0, fmt.Errorf("sockowner: %w", errors.Join(err, perr))
}
