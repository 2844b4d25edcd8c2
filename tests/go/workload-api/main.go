// Command workload-api serves the SPIFFE Workload API's FetchX509SVID on a
// unix socket, from PEM files (svid.pem, svid.key, bundle.pem in -dir),
// streaming a new response whenever the files change: a stand-in for
// SPIRE's agent in the tests, built on go-spiffe's own generated server so
// the Rust client is checked against upstream's wire, not ours.
package main

import (
	"crypto/x509"
	"encoding/pem"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

type server struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	dir string

	mu      sync.Mutex
	current *workload.X509SVIDResponse
	stamp   string
	changed chan struct{}
}

func ders(path, kind string) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []byte
	for {
		var b *pem.Block
		b, raw = pem.Decode(raw)
		if b == nil {
			break
		}
		if b.Type == kind {
			out = append(out, b.Bytes...)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no %s", path, kind)
	}
	return out, nil
}

func (s *server) load() (*workload.X509SVIDResponse, error) {
	chain, err := ders(filepath.Join(s.dir, "svid.pem"), "CERTIFICATE")
	if err != nil {
		return nil, err
	}
	key, err := ders(filepath.Join(s.dir, "svid.key"), "PRIVATE KEY")
	if err != nil {
		return nil, err
	}
	bundle, err := ders(filepath.Join(s.dir, "bundle.pem"), "CERTIFICATE")
	if err != nil {
		return nil, err
	}
	certs, err := x509.ParseCertificates(chain)
	if err != nil || len(certs) == 0 || len(certs[0].URIs) != 1 {
		return nil, fmt.Errorf("svid.pem: not an X.509-SVID: %v", err)
	}
	return &workload.X509SVIDResponse{Svids: []*workload.X509SVID{{
		SpiffeId:    certs[0].URIs[0].String(),
		X509Svid:    chain,
		X509SvidKey: key,
		Bundle:      bundle,
	}}}, nil
}

// watch reloads the files when their modification times change.
func (s *server) watch() {
	for {
		stamp := ""
		for _, f := range []string{"svid.pem", "svid.key", "bundle.pem"} {
			if st, err := os.Stat(filepath.Join(s.dir, f)); err == nil {
				stamp += st.ModTime().String()
			}
		}
		if stamp != s.stamp {
			if resp, err := s.load(); err == nil {
				s.mu.Lock()
				s.current, s.stamp = resp, stamp
				close(s.changed)
				s.changed = make(chan struct{})
				s.mu.Unlock()
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (s *server) FetchX509SVID(_ *workload.X509SVIDRequest, stream workload.SpiffeWorkloadAPI_FetchX509SVIDServer) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	if v := md.Get("workload.spiffe.io"); len(v) != 1 || v[0] != "true" {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	for {
		s.mu.Lock()
		resp, changed := s.current, s.changed
		s.mu.Unlock()
		if resp != nil {
			if err := stream.Send(resp); err != nil {
				return err
			}
		}
		select {
		case <-changed:
		case <-stream.Context().Done():
			return nil
		}
	}
}

func main() {
	socket := flag.String("socket", "", "unix socket to serve on")
	dir := flag.String("dir", "", "directory of svid.pem, svid.key, bundle.pem")
	flag.Parse()
	if *socket == "" || *dir == "" {
		log.Fatal("-socket and -dir are required")
	}
	l, err := net.Listen("unix", *socket)
	if err != nil {
		log.Fatal(err)
	}
	s := &server{dir: *dir, changed: make(chan struct{})}
	go s.watch()
	g := grpc.NewServer()
	workload.RegisterSpiffeWorkloadAPIServer(g, s)
	log.Fatal(g.Serve(l))
}
