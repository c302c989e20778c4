// Command tlsrelay is the benchmark's reference: the least a Go program must do to carry
// TCP over mutual TLS 1.3 between two hosts. With -role client it accepts plain TCP and
// dials one TLS connection per accepted connection; with -role server it accepts TLS and
// dials one plain TCP connection to -connect per TLS connection. Every handshake is a full
// one (no session tickets) and the bytes are moved with io.Copy, so agentmesh's tls
// transport can be measured against exactly this. It is not a proxy for production use:
// no identity checks beyond the chain, no policy, no audit, no rotation.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"
)

// serverName is the DNS SAN of the server certificate that meshbench issues.
const serverName = "tlsrelay.invalid"

func main() {
	role := flag.String("role", "", "client (plain TCP in, TLS out) or server (TLS in, plain TCP out)")
	listen := flag.String("listen", "127.0.0.1:0", "address to accept on")
	connect := flag.String("connect", "", "address to dial for each accepted connection")
	certFile := flag.String("cert", "", "PEM certificate chain (leaf first)")
	keyFile := flag.String("key", "", "PEM private key")
	caFile := flag.String("ca", "", "PEM root certificate that both sides chain to")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *role, *listen, *connect, *certFile, *keyFile, *caFile); err != nil {
		fmt.Fprintln(os.Stderr, "tlsrelay:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, role, listen, connect, certFile, keyFile, caFile string) error {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return fmt.Errorf("load key pair: %w", err)
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return fmt.Errorf("read ca: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return fmt.Errorf("no certificate in %s", caFile)
	}
	var r relay
	switch role {
	case "client":
		r.dial = func(ctx context.Context) (net.Conn, error) {
			d := tls.Dialer{Config: &tls.Config{
				MinVersion:   tls.VersionTLS13,
				Certificates: []tls.Certificate{cert},
				RootCAs:      roots,
				ServerName:   serverName,
				// No ClientSessionCache: every handshake is a full one.
			}}
			return d.DialContext(ctx, "tcp", connect)
		}
		r.accepted = func(_ context.Context, c net.Conn) (net.Conn, error) { return c, nil }
	case "server":
		cfg := &tls.Config{
			MinVersion:             tls.VersionTLS13,
			Certificates:           []tls.Certificate{cert},
			ClientAuth:             tls.RequireAndVerifyClientCert,
			ClientCAs:              roots,
			SessionTicketsDisabled: true,
		}
		var d net.Dialer
		r.dial = func(ctx context.Context) (net.Conn, error) { return d.DialContext(ctx, "tcp", connect) }
		r.accepted = func(ctx context.Context, c net.Conn) (net.Conn, error) {
			tc := tls.Server(c, cfg)
			return tc, tc.HandshakeContext(ctx)
		}
	default:
		return fmt.Errorf("-role must be client or server, not %q", role)
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	// meshbench waits for this line before it sends traffic.
	fmt.Fprintf(os.Stderr, "tlsrelay: %s listening on %s\n", role, ln.Addr())
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		wg.Go(func() { r.serve(ctx, c) })
	}
}

// relay carries each accepted connection to a freshly dialled one.
type relay struct {
	accepted func(ctx context.Context, c net.Conn) (net.Conn, error) // TLS server side or as is
	dial     func(ctx context.Context) (net.Conn, error)
}

func (r *relay) serve(ctx context.Context, c net.Conn) {
	defer c.Close()
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	in, err := r.accepted(hctx, c)
	if err != nil {
		return
	}
	out, err := r.dial(hctx)
	if err != nil {
		return
	}
	defer out.Close()
	done := make(chan struct{})
	go func() {
		copyHalf(out, in)
		close(done)
	}()
	copyHalf(in, out)
	<-done
}

// copyHalf copies until src ends, then half-closes dst so the far side sees EOF while the
// other direction keeps flowing; on an error it closes both.
func copyHalf(dst, src net.Conn) {
	if _, err := io.Copy(dst, src); err != nil && !errors.Is(err, net.ErrClosed) {
		dst.Close()
		src.Close()
		return
	}
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}
