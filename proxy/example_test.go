package proxy_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/proxy"
)

// Example runs two proxies on loopback. Proxy A has a Route for agents on
// its host; proxy B, host of an echo service, has a Service allowing A. An
// agent's plain TCP connection to A's route reaches the echo service through
// an mTLS tunnel in which each side has verified the other's SPIFFE ID.
func Example() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// In production the rotator supplies Credentials; here a test CA does.
	ca := testca.New(exampleTB{})
	hostA := spiffeid.RequireFromString("spiffe://example.org/host/a")
	hostB := spiffeid.RequireFromString("spiffe://example.org/host/b")

	echoLn, echoPort := startEcho()
	defer echoLn.Close()

	b, err := proxy.New(proxy.Config{
		ID:           hostB,
		Credentials:  testca.NewCredentials(ca, ca.SVID(exampleTB{}, hostB)),
		TunnelListen: "127.0.0.1:0",
		Services:     []proxy.Service{{Port: echoPort, Allow: []spiffeid.ID{hostA}}},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	a, err := proxy.New(proxy.Config{
		ID:           hostA,
		Credentials:  testca.NewCredentials(ca, ca.SVID(exampleTB{}, hostA)),
		TunnelListen: "127.0.0.1:0",
		Routes: []proxy.Route{{
			Listen:     "127.0.0.1:0",
			Peer:       b.TunnelAddr().String(),
			PeerID:     hostB, // nobody else may answer
			TargetPort: echoPort,
		}},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	var wg sync.WaitGroup
	defer wg.Wait() // Run returns once cancel (deferred later, run first) stops it
	defer cancel()
	wg.Go(func() { _ = a.Run(ctx) })
	wg.Go(func() { _ = b.Run(ctx) })

	agent, err := net.Dial("tcp", a.RouteAddr(0).String())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer agent.Close()
	_, _ = agent.Write([]byte("hello through the mesh"))
	_ = agent.(*net.TCPConn).CloseWrite()
	reply, _ := io.ReadAll(agent)
	fmt.Println(string(reply))
	// Output: hello through the mesh
}

// Example_explicitCapture: an agent that only knows HTTP_PROXY reaches a web
// service on B's host. Proxy A listens as an explicit proxy; its Directory
// says proxy B lives at the service's address, so the request travels
// through an mTLS tunnel to B, which delivers it locally.
func Example_explicitCapture() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ca := testca.New(exampleTB{})
	hostA := spiffeid.RequireFromString("spiffe://example.org/host/a")
	hostB := spiffeid.RequireFromString("spiffe://example.org/host/b")

	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = fmt.Fprintf(w, "hello from B's host, %s", r.URL.Path)
	}))
	defer web.Close()
	webAddr := netip.MustParseAddrPort(web.Listener.Addr().String())

	// Configured as in Example; exampleConfig fills in ID, Credentials and a
	// loopback tunnel port.
	bc := exampleConfig(ca, hostB)
	bc.Services = []proxy.Service{{Port: webAddr.Port(), Allow: []spiffeid.ID{hostA}}}
	b, err := proxy.New(bc)
	if err != nil {
		fmt.Println(err)
		return
	}
	ac := exampleConfig(ca, hostA)
	ac.Explicit = "127.0.0.1:0" // ":15080" in production
	// In production the registry feeds the Directory.
	ac.Directory = directoryFunc(func(addr netip.Addr) (proxy.Peer, bool) {
		if addr == webAddr.Addr() {
			return proxy.Peer{ID: hostB, Tunnel: b.TunnelAddr().String()}, true
		}
		return proxy.Peer{}, false
	})
	ac.Unknown = proxy.UnknownDeny // nothing leaves unauthenticated
	a, err := proxy.New(ac)
	if err != nil {
		fmt.Println(err)
		return
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	wg.Go(func() { _ = a.Run(ctx) })
	wg.Go(func() { _ = b.Run(ctx) })

	// What HTTP_PROXY=http://127.0.0.1:15080 does for most clients.
	proxyURL := &url.URL{Scheme: "http", Host: a.ExplicitAddr().String()}
	tr := &http.Transport{Proxy: http.ProxyURL(proxyURL)}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(web.URL + "/greeting")
	if err != nil {
		fmt.Println(err)
		return
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	fmt.Println(resp.Status, string(body))
	// Output: 200 OK hello from B's host, /greeting
}

// ExampleProxy_SetDenyList revokes host A at proxy B while A has a tunnel
// open: B closes it at once, and refuses A from then on. In production the
// directory client calls SetDenyList with each verified *meshapi.DenyList.
func ExampleProxy_SetDenyList() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ca := testca.New(exampleTB{})
	hostA := spiffeid.RequireFromString("spiffe://example.org/host/a")
	hostB := spiffeid.RequireFromString("spiffe://example.org/host/b")

	echoLn, echoPort := startEcho()
	defer echoLn.Close()

	bc := exampleConfig(ca, hostB) // as in Example
	bc.Services = []proxy.Service{{Port: echoPort, Allow: []spiffeid.ID{hostA}}}
	b, err := proxy.New(bc)
	if err != nil {
		fmt.Println(err)
		return
	}
	ac := exampleConfig(ca, hostA)
	ac.Routes = []proxy.Route{{Listen: "127.0.0.1:0", Peer: b.TunnelAddr().String(), PeerID: hostB, TargetPort: echoPort}}
	a, err := proxy.New(ac)
	if err != nil {
		fmt.Println(err)
		return
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	wg.Go(func() { _ = a.Run(ctx) })
	wg.Go(func() { _ = b.Run(ctx) })

	agent, err := net.Dial("tcp", a.RouteAddr(0).String())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer agent.Close()
	_, _ = agent.Write([]byte("ping"))
	reply := make([]byte, 4)
	_, _ = io.ReadFull(agent, reply)
	fmt.Println(string(reply))

	fmt.Println("closed:", b.SetDenyList(deniedIDs{hostA}))
	_, _ = io.ReadAll(agent) // ends when A sees B close the tunnel
	fmt.Println("tunnel gone")

	again, err := net.Dial("tcp", a.RouteAddr(0).String())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer again.Close()
	_, _ = again.Write([]byte("ping"))
	got, _ := io.ReadAll(again)
	fmt.Printf("after revocation: %d bytes\n", len(got))
	// Output:
	// ping
	// closed: 1
	// tunnel gone
	// after revocation: 0 bytes
}

// startEcho runs an echo service on a loopback port until its listener closes.
func startEcho() (net.Listener, uint16) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); _ = c.Close() }()
		}
	}()
	return ln, uint16(ln.Addr().(*net.TCPAddr).Port)
}

// exampleConfig is the part of a proxy's Config every example shares: its
// identity, an SVID from ca, and a loopback tunnel port.
func exampleConfig(ca *testca.CA, id spiffeid.ID) proxy.Config {
	return proxy.Config{
		ID:           id,
		Credentials:  testca.NewCredentials(ca, ca.SVID(exampleTB{}, id)),
		TunnelListen: "127.0.0.1:0",
	}
}

// deniedIDs is a proxy.Denier that denies every certificate of the listed
// identities.
type deniedIDs []spiffeid.ID

func (d deniedIDs) Denies(id spiffeid.ID, _ string, _ time.Time) bool { return slices.Contains(d, id) }

// directoryFunc adapts a function to proxy.Directory.
type directoryFunc func(netip.Addr) (proxy.Peer, bool)

func (f directoryFunc) PeerFor(a netip.Addr) (proxy.Peer, bool) { return f(a) }

// exampleTB lets testca run outside a test function; it panics where a test
// would fail.
type exampleTB struct{ testing.TB }

func (exampleTB) Helper()                   {}
func (exampleTB) Fatalf(f string, a ...any) { panic(fmt.Sprintf(f, a...)) }
