package sockowner

import "errors"

// ErrNotFound means no process holds a TCP socket with the addresses asked for in this
// network namespace: there is no such socket, or it has been closed and only the kernel
// still keeps it (draining, TIME_WAIT), or it is waiting in a listener's accept queue.
var ErrNotFound = errors.New("sockowner: no such socket")
