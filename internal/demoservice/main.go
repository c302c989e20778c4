// Command demoservice is the small HTTP service that `make demo` puts behind a proxy: it
// answers every request with its name and a counter, and knows nothing of the mesh.
package main

import (
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"sync/atomic"
	"time"
)

func main() {
	addr := flag.String("listen", "127.0.0.1:18081", "address to serve on")
	name := flag.String("name", "service-b", "name to answer with")
	flag.Parse()
	var n atomic.Int64
	srv := &http.Server{
		Addr:              *addr,
		ReadHeaderTimeout: 5 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			_, _ = fmt.Fprintf(w, "hello from %s, request %d\n", *name, n.Add(1)) // the client went away
		}),
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("%s listening on %s", *name, ln.Addr())
	log.Fatal(srv.Serve(ln))
}
