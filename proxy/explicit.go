package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"time"
)

// explicitReaderSize sizes reads of an explicit-capture request; the head
// limit (maxRequestHead) is enforced by the parser, not by this buffer.
const explicitReaderSize = 4 << 10

// explicitTarget is what an explicit-capture client asked for, in either
// protocol.
type explicitTarget struct {
	addr netip.Addr // set when the client named an address
	host string     // else the host name to resolve
	port uint16
	// head is sent to the destination before the client's bytes: the
	// rewritten absolute-URI request, nil otherwise.
	head []byte
	// answer is the reply that tells the client the outcome (reason "" or
	// passthrough is success); nil for nothing to say.
	answer func(reason Reason) []byte
}

func (t explicitTarget) authority() string {
	if t.addr.IsValid() {
		return netip.AddrPortFrom(t.addr, t.port).String()
	}
	return joinHostPort(t.host, t.port)
}

// serveExplicit serves one client of the explicit listener: it tells SOCKS5
// (first byte 0x05) from HTTP, reads the request, resolves a host name, and
// hands the destination to capture, as transparent capture does. Every
// outcome is recorded once, and the client always gets its protocol's
// answer when there is one to give.
func (p *Proxy) serveExplicit(ctx context.Context, agent net.Conn) {
	o, stop := p.newOutbound(ctx, agent, modeExplicit)
	defer stop()
	// Before reading anything: a client from the network gets no answer
	// to parse, only the closed connection (and an audit record).
	if !p.fromThisHost(ctx, o) {
		return
	}
	// One deadline covers the request; it stays for an error reply and the
	// linger after it, and is lifted once bytes may flow.
	_ = agent.SetDeadline(o.accepted.Add(p.cfg.HandshakeTimeout))
	br := bufio.NewReaderSize(agent, explicitReaderSize)

	var t explicitTarget
	first, err := br.Peek(1)
	if err == nil {
		if first[0] == socksVersion5 {
			t, err = readSOCKS(br, agent)
		} else {
			t, err = readHTTP(br)
		}
	}
	if err != nil {
		var re *requestError
		if errors.As(err, &re) && re.reply != nil {
			o.reply = func(Reason, error) error { return write(agent, re.reply) }
		}
		p.conclude(ctx, o, classify(ctx, err), fmt.Errorf("read proxy request: %w", err))
		return
	}

	o.s.dst = t.authority()
	o.s.peerAddr = o.s.dst
	o.reply = func(reason Reason, _ error) error {
		if resultFor(reason) == resultOK {
			// Bytes flow from now on, for as long as they like.
			_ = agent.SetDeadline(time.Time{})
		}
		return write(agent, t.answer(reason))
	}
	// What the parser read past the request (a pipelined ClientHello, the
	// start of a body) and the rewritten request go first.
	if n := br.Buffered(); n > 0 || t.head != nil {
		rest, _ := br.Peek(n)
		o.c.local = &prefixConn{Conn: agent, prefix: slices.Concat(t.head, rest)}
	}

	// After the request, so that a refused client gets its protocol's
	// answer; the client's socket points at our listener.
	if !p.attribute(ctx, o, addrPortOf(agent.LocalAddr())) {
		return
	}
	dst, err := p.resolve(ctx, t)
	if err != nil {
		reason := ReasonResolveFailed
		if ctx.Err() != nil {
			reason = ReasonShutdown
		}
		p.conclude(ctx, o, reason, err)
		return
	}
	p.capture(ctx, o, dst)
}

// readSOCKS runs the SOCKS5 exchange up to the request: greeting, method
// selection ("no authentication"), request.
func readSOCKS(br *bufio.Reader, w io.Writer) (explicitTarget, error) {
	if err := readSOCKSGreeting(br); err != nil {
		return explicitTarget{}, err
	}
	if err := write(w, socksMethodNoneReply); err != nil {
		return explicitTarget{}, err
	}
	req, err := readSOCKSRequest(br)
	if err != nil {
		return explicitTarget{}, err
	}
	return explicitTarget{addr: req.addr, host: req.host, port: req.port, answer: func(reason Reason) []byte {
		return socksReply(socksReplyCode(reason))
	}}, nil
}

// readHTTP reads an HTTP proxy request.
func readHTTP(br *bufio.Reader) (explicitTarget, error) {
	req, err := readHTTPRequest(br)
	if err != nil {
		return explicitTarget{}, err
	}
	t := explicitTarget{addr: req.addr, host: req.host, port: req.port, head: req.head}
	t.answer = func(reason Reason) []byte {
		switch {
		case resultFor(reason) != resultOK:
			return httpResponse(httpStatus(reason), reason)
		case req.connect:
			return []byte(connectEstablished)
		default:
			return nil // the destination answers the forwarded request
		}
	}
	return t, nil
}

// resolve turns the target into one destination. A host name is resolved
// with the system resolver within DialTimeout; of its addresses the first one
// a proxy lives at wins, so a name with meshed and unmeshed addresses goes
// through the mesh; else the first.
func (p *Proxy) resolve(ctx context.Context, t explicitTarget) (netip.AddrPort, error) {
	if t.addr.IsValid() {
		return netip.AddrPortFrom(t.addr, t.port), nil
	}
	rctx, cancel := context.WithTimeout(ctx, p.cfg.DialTimeout)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupNetIP(rctx, "ip", t.host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("resolve %s: %w", t.host, err)
	}
	if len(addrs) == 0 {
		return netip.AddrPort{}, fmt.Errorf("resolve %s: no addresses", t.host)
	}
	pick := addrs[0]
	for _, a := range addrs {
		if _, ok := p.lookup(a); ok {
			pick = a
			break
		}
	}
	return netip.AddrPortFrom(pick.Unmap(), t.port), nil
}

// replyClass sorts the outcome of a setup into what an explicit-capture
// client can be told.
type replyClass int

const (
	replyOK          replyClass = iota
	replyNotAllowed             // a decision said no: policy, identity, loop
	replyUnreachable            // the destination or its proxy did not answer
	replyFailed                 // anything else: our failure, a protocol error
)

func classifyReply(reason Reason) replyClass {
	// The reasons not listed are classified by resultFor below.
	//exhaustive:ignore
	switch reason {
	case ReasonPeerUnreachable, ReasonTargetUnreachable, ReasonResolveFailed, ReasonTimeout, ReasonPeerClosed:
		return replyUnreachable
	case ReasonBadRequest, ReasonUnsupported, ReasonNotTLS, ReasonHandshakeFailed:
		return replyFailed
	}
	switch resultFor(reason) {
	case resultOK:
		return replyOK
	case resultRefused:
		return replyNotAllowed
	default:
		return replyFailed
	}
}

// socksReplyCode is the SOCKS5 REP for the outcome of a setup.
func socksReplyCode(reason Reason) byte {
	switch classifyReply(reason) {
	case replyOK:
		return socksSucceeded
	case replyNotAllowed:
		return socksNotAllowed
	case replyUnreachable:
		return socksHostUnreachable
	default:
		return socksGeneralFailure
	}
}

// httpStatus is the HTTP status for the outcome of a setup that failed.
func httpStatus(reason Reason) int {
	if classifyReply(reason) == replyNotAllowed {
		return http.StatusForbidden
	}
	return http.StatusBadGateway
}

// write writes all of b (nothing for an empty b).
func write(w io.Writer, b []byte) error {
	if len(b) == 0 {
		return nil
	}
	_, err := w.Write(b)
	return err
}
