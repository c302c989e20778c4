package sockowner

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

func (m diagMsg) String() string {
	return fmt.Sprintf("{family %d %v -> %v state %d uid %d inode %d}", m.family, m.local, m.remote, m.state, m.uid, m.inode)
}

// nlmsg frames body as one netlink message, padded as the kernel pads it.
func nlmsg(typ uint16, seq uint32, body []byte) []byte {
	n := unix.NLMSG_HDRLEN + len(body)
	b := make([]byte, (n+3)&^3)
	binary.NativeEndian.PutUint32(b[0:], uint32(n))
	binary.NativeEndian.PutUint16(b[4:], typ)
	binary.NativeEndian.PutUint32(b[8:], seq)
	copy(b[unix.NLMSG_HDRLEN:], body)
	return b
}

func errnoBody(errno unix.Errno) []byte {
	b := make([]byte, 4+unix.NLMSG_HDRLEN) // the error, then the request's header
	binary.NativeEndian.PutUint32(b, uint32(-int32(errno)))
	return b
}

// diagMsgBody encodes an inet_diag_msg as the kernel fills it in, with a trailing
// attribute as real replies have. The socket id is built with the request encoder,
// so the two agree on its layout.
func diagMsgBody(family, state uint8, local, remote netip.AddrPort, uid, inode uint32) []byte {
	var req [diagReqLen]byte
	putDiagRequest(req[:], 1, 0, family, 0, local, remote, 0)
	b := make([]byte, sizeofDiagMsg+8)
	b[0], b[1] = family, state
	copy(b[msgSockID:msgSockID+48], req[unix.NLMSG_HDRLEN+reqSockID:])
	binary.NativeEndian.PutUint32(b[msgUID:], uid)
	binary.NativeEndian.PutUint32(b[msgInode:], inode)
	copy(b[sizeofDiagMsg:], []byte{5, 0, 8, 0, 0}) // INET_DIAG_SHUTDOWN
	return b
}

func TestParseDiagReply(t *testing.T) {
	t.Parallel()
	const seq = 7
	v4l, v4r := netip.MustParseAddrPort("127.0.0.1:41211"), netip.MustParseAddrPort("10.1.2.3:443")
	v6l, v6r := netip.MustParseAddrPort("[fd00::2]:41211"), netip.MustParseAddrPort("[fd00::1]:443")
	mappedL, mappedR := netip.MustParseAddrPort("[::ffff:127.0.0.1]:41211"), netip.MustParseAddrPort("[::ffff:10.1.2.3]:443")
	v4 := nlmsg(unix.SOCK_DIAG_BY_FAMILY, seq, diagMsgBody(unix.AF_INET, 1, v4l, v4r, 1000, 77))
	cases := []struct {
		name    string
		reply   []byte
		want    diagReply
		wantErr error // nil: no error; errAny: some error
	}{
		{name: "ipv4 socket", reply: v4,
			want: diagReply{kind: replyMsg, msg: diagMsg{family: unix.AF_INET, state: 1, local: v4l, remote: v4r, uid: 1000, inode: 77}}},
		{name: "ipv6 socket", reply: nlmsg(unix.SOCK_DIAG_BY_FAMILY, seq, diagMsgBody(unix.AF_INET6, 1, v6l, v6r, 65534, 78)),
			want: diagReply{kind: replyMsg, msg: diagMsg{family: unix.AF_INET6, state: 1, local: v6l, remote: v6r, uid: 65534, inode: 78}}},
		{name: "dual-stack socket, addresses unmapped", reply: nlmsg(unix.SOCK_DIAG_BY_FAMILY, seq, diagMsgBody(unix.AF_INET6, 1, mappedL, mappedR, 5, 79)),
			want: diagReply{kind: replyMsg, msg: diagMsg{family: unix.AF_INET6, state: 1, local: v4l, remote: v4r, uid: 5, inode: 79}}},
		{name: "another request's socket first", reply: append(nlmsg(unix.SOCK_DIAG_BY_FAMILY, seq-1, diagMsgBody(unix.AF_INET, 1, v6l, v6r, 1, 1)), v4...),
			want: diagReply{kind: replyMsg, msg: diagMsg{family: unix.AF_INET, state: 1, local: v4l, remote: v4r, uid: 1000, inode: 77}}},
		{name: "cut short after the fixed part", reply: v4[:unix.NLMSG_HDRLEN+sizeofDiagMsg],
			want: diagReply{kind: replyMsg, msg: diagMsg{family: unix.AF_INET, state: 1, local: v4l, remote: v4r, uid: 1000, inode: 77}}},
		{name: "no such socket", reply: nlmsg(unix.NLMSG_ERROR, seq, errnoBody(unix.ENOENT)), wantErr: unix.ENOENT},
		{name: "acknowledgement only", reply: nlmsg(unix.NLMSG_ERROR, seq, errnoBody(0)), want: diagReply{kind: replyNone}},
		{name: "end of dump", reply: nlmsg(unix.NLMSG_DONE, seq, make([]byte, 4)), want: diagReply{kind: replyDone}},
		{name: "end of dump without errno", reply: nlmsg(unix.NLMSG_DONE, seq, nil), want: diagReply{kind: replyDone}},
		{name: "failed dump", reply: nlmsg(unix.NLMSG_DONE, seq, errnoBody(unix.ENOENT)[:4]), wantErr: unix.ENOENT},
		{name: "another request's error", reply: nlmsg(unix.NLMSG_ERROR, seq+1, errnoBody(unix.ENOENT)), want: diagReply{kind: replyNone}},
		{name: "empty", reply: nil, want: diagReply{kind: replyNone}},
		{name: "short header", reply: v4[:10], wantErr: errAny},
		{name: "length below header", reply: func() []byte {
			b := nlmsg(unix.SOCK_DIAG_BY_FAMILY, seq, nil)
			binary.NativeEndian.PutUint32(b, 8)
			return b
		}(), wantErr: errAny},
		{name: "short inet_diag_msg", reply: nlmsg(unix.SOCK_DIAG_BY_FAMILY, seq, make([]byte, sizeofDiagMsg-1)), wantErr: errAny},
		{name: "unknown family", reply: nlmsg(unix.SOCK_DIAG_BY_FAMILY, seq, diagMsgBody(unix.AF_UNIX, 1, v4l, v4r, 0, 1)), wantErr: errAny},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := parseDiagReply(tc.reply, seq)
			switch {
			case tc.wantErr == nil && err != nil,
				errors.Is(tc.wantErr, errAny) && err == nil,
				tc.wantErr != nil && !errors.Is(tc.wantErr, errAny) && !errors.Is(err, tc.wantErr):
				t.Fatalf("parseDiagReply: %v; want %v", err, tc.wantErr)
			case err == nil && got != tc.want:
				t.Fatalf("parseDiagReply = %+v; want %+v", got, tc.want)
			}
		})
	}
}

var errAny = errors.New("any error")

// FuzzParseDiagReply checks the reply parser never panics on what a socket might
// deliver, and only ever returns a socket with valid, unmapped addresses. (They may
// differ in family: an IPv6 listener bound to a mapped address has remote ::.)
func FuzzParseDiagReply(f *testing.F) {
	l, r := netip.MustParseAddrPort("[::ffff:127.0.0.1]:41211"), netip.MustParseAddrPort("[::ffff:10.1.2.3]:443")
	f.Add(nlmsg(unix.SOCK_DIAG_BY_FAMILY, 1, diagMsgBody(unix.AF_INET6, 1, l, r, 1000, 77)), uint32(1))
	f.Add(nlmsg(unix.NLMSG_ERROR, 1, errnoBody(unix.ENOENT)), uint32(1))
	f.Add(nlmsg(unix.NLMSG_DONE, 2, make([]byte, 4)), uint32(2))
	f.Fuzz(func(t *testing.T, b []byte, seq uint32) {
		got, err := parseDiagReply(b, seq)
		if err != nil || got.kind != replyMsg {
			return
		}
		m := got.msg
		if !m.local.IsValid() || !m.remote.IsValid() || m.local.Addr().Is4In6() || m.remote.Addr().Is4In6() {
			t.Fatalf("parsed socket %+v", m)
		}
	})
}

// A socket whose exchange ended early, with replies still queued, must not be reused:
// the next lookup would read those replies.
func TestUnfinishedExchangeIsNotReused(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0") // so the dump has a socket to send
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	s, err := openDiag()
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	var req [diagReqLen]byte
	s.seq++
	putDiagRequest(req[:], s.seq, unix.NLM_F_REQUEST|unix.NLM_F_DUMP, unix.AF_INET, allStates, netip.AddrPort{}, netip.AddrPort{}, 0)
	var buf [diagBufLen]byte
	if _, err := s.roundTrip(req[:], buf[:], replyDone); err == nil || !s.pending {
		t.Fatalf("dump of every socket, expecting its end at once: %v, pending %v", err, s.pending)
	}
}

// Lookups running at once, hits and misses (which probe) mixed, each get their own
// answer from the pooled sockets.
func TestConcurrentLookups(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var pairs [][2]netip.AddrPort
	for range 20 {
		client, _ := connect(t, ln, ln.Addr().String())
		l, r := ends(client)
		pairs = append(pairs, [2]netip.AddrPort{l, r})
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 200 {
				p := pairs[(g+i)%len(pairs)]
				if i%3 == 0 {
					checkNotFound(t, UID, p[0], otherPort(p[1]))
					continue
				}
				checkUID(t, UID, p[0], p[1], os.Geteuid())
			}
		})
	}
	wg.Wait()
}
