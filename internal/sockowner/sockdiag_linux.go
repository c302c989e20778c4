package sockowner

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// Layout of the sock_diag messages (linux/inet_diag.h), which x/sys/unix does not
// define. Multi-byte fields are host order except ports and addresses.
const (
	sizeofDiagReq = 56 // struct inet_diag_req_v2
	sizeofDiagMsg = 72 // struct inet_diag_msg
	diagReqLen    = unix.NLMSG_HDRLEN + sizeofDiagReq

	// Offsets of struct inet_diag_sockid inside the request and the reply.
	reqSockID = 8
	msgSockID = 4

	msgUID   = 64
	msgInode = 68

	allStates = ^uint32(0)
	tcpListen = 10 // TCP_LISTEN in the kernel's state numbering

	// diagBufLen holds a reply to an exact lookup with no extensions asked for
	// (under 200 bytes) many times over.
	diagBufLen = 4096
	// diagTimeoutMS bounds the wait for a reply the kernel normally queues before
	// the request's write returns.
	diagTimeoutMS = 1000
)

// errNoDiagReply means the kernel did not answer a sock_diag request in time.
var errNoDiagReply = errors.New("no sock_diag reply")

// diagUID finds the socket with sock_diag. An error other than ErrNotFound means the
// interface itself failed, and the caller should look elsewhere.
func diagUID(q query) (uint32, error) {
	s, err := getDiag()
	if err != nil {
		return 0, err
	}
	defer s.release()
	uid, err := s.find(q)
	if !errors.Is(err, unix.ENOENT) {
		return uid, err
	}
	// The kernel answers ENOENT both when there is no such socket and when it has
	// no TCP diag handler; an empty dump tells the two apart for one more round trip.
	if perr := s.probe(); perr != nil {
		return 0, fmt.Errorf("sock_diag unavailable: %w", perr)
	}
	return 0, ErrNotFound
}

// diagPool keeps sock_diag sockets between lookups: creating, binding and closing one
// costs more than the lookup itself. A socket the pool drops is closed by its cleanup.
// The sockets belong to the network namespace of the thread that created them, which
// is why UID must not be called from threads moved to another namespace.
var diagPool sync.Pool

// diagSocket is a NETLINK_SOCK_DIAG socket used by one goroutine at a time. It is
// non-blocking: the kernel queues its reply during the request's write, so reads only
// wait (in poll, bounded) if that ever changes.
type diagSocket struct {
	fd      int
	seq     uint32
	pending bool // an exchange did not finish: unread replies may follow
	cleanup runtime.Cleanup
}

func getDiag() (*diagSocket, error) {
	if s, ok := diagPool.Get().(*diagSocket); ok {
		return s, nil
	}
	return openDiag()
}

func openDiag() (*diagSocket, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sock_diag socket: %w", err)
	}
	s := &diagSocket{fd: fd}
	s.cleanup = runtime.AddCleanup(s, closeFD, fd)
	return s, nil
}

// closeFD closes a sock_diag socket; a failed close of one loses nothing (no data is
// buffered for sending), and the descriptor is released either way.
func closeFD(fd int) { _ = unix.Close(fd) }

func (s *diagSocket) close() {
	s.cleanup.Stop()
	closeFD(s.fd)
}

// release returns s to the pool, unless a reply to an unfinished exchange could
// still arrive and be taken for the answer to the next one.
func (s *diagSocket) release() {
	if s.pending {
		s.close()
		return
	}
	diagPool.Put(s)
}

// find looks the socket up in the family it was asked in. IPv4 sockets of dual-stack
// listeners are hashed by their IPv4 addresses, so the IPv4 lookup finds them; the
// caller's IPv4-mapped form is tried too, for kernels that would not.
func (s *diagSocket) find(q query) (uint32, error) {
	if !q.local.Addr().Is4() {
		ifindex, err := zoneIndex(q.zone)
		if err != nil {
			return 0, err
		}
		return s.owner(unix.AF_INET6, q.local, q.remote, ifindex)
	}
	uid, err := s.owner(unix.AF_INET, q.local, q.remote, 0)
	if !q.mapped || (!errors.Is(err, unix.ENOENT) && !errors.Is(err, ErrNotFound)) {
		return uid, err
	}
	return s.owner(unix.AF_INET6, mapAddrPort(q.local), mapAddrPort(q.remote), 0)
}

// owner returns the uid of the process holding the socket with the given addresses.
// It checks the kernel's answer is that socket: the kernel falls back to a listener on
// the local port when no connection matches, and reports uid 0 for sockets no process
// holds (those have no inode).
func (s *diagSocket) owner(family uint8, local, remote netip.AddrPort, ifindex uint32) (uint32, error) {
	m, err := s.exact(family, local, remote, ifindex)
	if err != nil {
		return 0, err
	}
	if m.local != unmapAddrPort(local) || m.remote != unmapAddrPort(remote) || m.state == tcpListen || m.inode == 0 {
		return 0, ErrNotFound
	}
	return m.uid, nil
}

// exact asks the kernel for the socket with the given addresses, as it finds it.
func (s *diagSocket) exact(family uint8, local, remote netip.AddrPort, ifindex uint32) (diagMsg, error) {
	var req [diagReqLen]byte
	s.seq++
	putDiagRequest(req[:], s.seq, unix.NLM_F_REQUEST, family, allStates, local, remote, ifindex)
	var buf [diagBufLen]byte
	r, err := s.roundTrip(req[:], buf[:], replyMsg)
	return r.msg, err
}

// probe dumps the TCP sockets in no state, which costs the kernel nothing but fails
// when it cannot dump TCP sockets at all.
func (s *diagSocket) probe() error {
	var req [diagReqLen]byte
	s.seq++
	putDiagRequest(req[:], s.seq, unix.NLM_F_REQUEST|unix.NLM_F_DUMP, unix.AF_INET, 0, netip.AddrPort{}, netip.AddrPort{}, 0)
	var buf [diagBufLen]byte
	_, err := s.roundTrip(req[:], buf[:], replyDone)
	return err
}

// roundTrip sends req and returns the answer to it, which must be of kind want or an
// error reply (returned as a replyError).
func (s *diagSocket) roundTrip(req, buf []byte, want replyKind) (diagReply, error) {
	s.pending = true
	if _, err := unix.Write(s.fd, req); err != nil {
		return diagReply{}, fmt.Errorf("sock_diag write: %w", err)
	}
	for {
		n, err := unix.Read(s.fd, buf)
		switch {
		case errors.Is(err, unix.EAGAIN):
			if err := s.wait(); err != nil {
				return diagReply{}, err
			}
			continue
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return diagReply{}, fmt.Errorf("sock_diag read: %w", err)
		}
		r, err := parseDiagReply(buf[:n], s.seq)
		if err != nil {
			// An error reply ends the exchange; a malformed one may not have.
			var rerr replyError
			s.pending = !errors.As(err, &rerr)
			return r, err
		}
		switch {
		case r.kind == want:
			s.pending = false
			return r, nil
		case r.kind != replyNone:
			return r, fmt.Errorf("sock_diag: reply of kind %d, want %d", r.kind, want)
		}
	}
}

func (s *diagSocket) wait() error {
	fds := []unix.PollFd{{Fd: int32(s.fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, diagTimeoutMS)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return fmt.Errorf("sock_diag poll: %w", err)
		case n == 0:
			return errNoDiagReply
		}
		return nil
	}
}

// putDiagRequest encodes a netlink message carrying a struct inet_diag_req_v2 into b
// (diagReqLen bytes). The cookie is INET_DIAG_NOCOOKIE: any socket generation matches.
func putDiagRequest(b []byte, seq uint32, flags uint16, family uint8, states uint32, local, remote netip.AddrPort, ifindex uint32) {
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], diagReqLen)
	ne.PutUint16(b[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(b[6:], flags)
	ne.PutUint32(b[8:], seq)
	ne.PutUint32(b[12:], 0) // port id: the kernel fills ours in
	r := b[unix.NLMSG_HDRLEN:diagReqLen]
	r[0] = family
	r[1] = unix.IPPROTO_TCP
	r[2] = 0 // idiag_ext: no extensions
	r[3] = 0
	ne.PutUint32(r[4:], states)
	id := r[reqSockID:]
	putSockID(id, local, remote)
	ne.PutUint32(id[36:], ifindex)
	ne.PutUint32(id[40:], ^uint32(0))
	ne.PutUint32(id[44:], ^uint32(0))
}

// putSockID writes the ports and addresses of struct inet_diag_sockid (network order;
// an IPv4 address takes the first four bytes of its slot).
func putSockID(id []byte, local, remote netip.AddrPort) {
	binary.BigEndian.PutUint16(id[0:], local.Port())
	binary.BigEndian.PutUint16(id[2:], remote.Port())
	putAddr(id[4:20], local.Addr())
	putAddr(id[20:36], remote.Addr())
}

func putAddr(b []byte, a netip.Addr) {
	clear(b)
	switch {
	case a.Is4():
		a4 := a.As4()
		copy(b, a4[:])
	case a.Is6():
		a16 := a.As16()
		copy(b, a16[:])
	}
}

// replyError is an error the kernel answered a request with.
type replyError struct{ errno unix.Errno }

func (e replyError) Error() string { return "sock_diag: " + e.errno.Error() }
func (e replyError) Unwrap() error { return e.errno }

type replyKind int

const (
	replyNone replyKind = iota // nothing answering our request in this datagram
	replyMsg                   // a socket
	replyDone                  // the end of a dump
)

type diagReply struct {
	kind replyKind
	msg  diagMsg
}

// diagMsg is the part of struct inet_diag_msg lookups need, addresses unmapped.
type diagMsg struct {
	family, state uint8
	local, remote netip.AddrPort
	uid           uint32
	inode         uint32
}

// parseDiagReply reads the netlink messages of one datagram and returns the first one
// answering request seq: a socket, the end of a dump, or the error the kernel sent.
// Messages for other requests are skipped; a datagram cut short by a small buffer still
// yields its socket if the fixed part of inet_diag_msg is there.
func parseDiagReply(b []byte, seq uint32) (diagReply, error) {
	ne := binary.NativeEndian
	for len(b) > 0 {
		if len(b) < unix.NLMSG_HDRLEN {
			return diagReply{}, fmt.Errorf("sock_diag: short netlink header (%d bytes)", len(b))
		}
		n := int(ne.Uint32(b[0:]))
		typ := ne.Uint16(b[4:])
		if n < unix.NLMSG_HDRLEN {
			return diagReply{}, fmt.Errorf("sock_diag: bad netlink message length %d", n)
		}
		n = min(n, len(b))
		body := b[unix.NLMSG_HDRLEN:n]
		if ne.Uint32(b[8:]) == seq {
			switch typ {
			case unix.NLMSG_ERROR, unix.NLMSG_DONE:
				// Both carry an errno, negated; a dump's end may omit it.
				var errno int32
				if len(body) >= 4 {
					errno = int32(ne.Uint32(body))
				}
				if errno != 0 {
					return diagReply{}, replyError{unix.Errno(-errno)}
				}
				if typ == unix.NLMSG_DONE {
					return diagReply{kind: replyDone}, nil
				}
				// An acknowledgement: the answer proper follows.
			case unix.SOCK_DIAG_BY_FAMILY:
				m, err := parseDiagMsg(body)
				if err != nil {
					return diagReply{}, err
				}
				return diagReply{kind: replyMsg, msg: m}, nil
			}
		}
		// Messages are padded to four bytes.
		n = (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1)
		if n >= len(b) {
			break
		}
		b = b[n:]
	}
	return diagReply{kind: replyNone}, nil
}

func parseDiagMsg(b []byte) (diagMsg, error) {
	if len(b) < sizeofDiagMsg {
		return diagMsg{}, fmt.Errorf("sock_diag: short inet_diag_msg (%d bytes)", len(b))
	}
	m := diagMsg{
		family: b[0],
		state:  b[1],
		uid:    binary.NativeEndian.Uint32(b[msgUID:]),
		inode:  binary.NativeEndian.Uint32(b[msgInode:]),
	}
	id := b[msgSockID:]
	sport := binary.BigEndian.Uint16(id[0:])
	dport := binary.BigEndian.Uint16(id[2:])
	var src, dst netip.Addr
	switch m.family {
	case unix.AF_INET:
		src = netip.AddrFrom4([4]byte(id[4:8]))
		dst = netip.AddrFrom4([4]byte(id[20:24]))
	case unix.AF_INET6:
		src = netip.AddrFrom16([16]byte(id[4:20])).Unmap()
		dst = netip.AddrFrom16([16]byte(id[20:36])).Unmap()
	default:
		return diagMsg{}, fmt.Errorf("sock_diag: socket of family %d", m.family)
	}
	m.local = netip.AddrPortFrom(src, sport)
	m.remote = netip.AddrPortFrom(dst, dport)
	return m, nil
}

func mapAddrPort(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom16(ap.Addr().As16()), ap.Port())
}

func unmapAddrPort(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// zoneIndex turns an IPv6 zone into the interface index the kernel matches a
// link-local socket's bound device against (0: any device).
func zoneIndex(zone string) (uint32, error) {
	if zone == "" {
		return 0, nil
	}
	if i, err := strconv.ParseUint(zone, 10, 32); err == nil {
		return uint32(i), nil
	}
	ifi, err := net.InterfaceByName(zone)
	if err != nil {
		return 0, fmt.Errorf("zone %q: %w", zone, err)
	}
	return uint32(ifi.Index), nil
}
