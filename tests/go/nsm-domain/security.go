package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"time"

	"github.com/edwarnicke/genericsync"
	"github.com/edwarnicke/grpcfd"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/networkservicemesh/api/pkg/api/networkservice"
	"github.com/networkservicemesh/sdk/pkg/networkservice/common/authorize"
	registryauthorize "github.com/networkservicemesh/sdk/pkg/registry/common/authorize"
	"github.com/networkservicemesh/sdk/pkg/tools/log"
	authmonitor "github.com/networkservicemesh/sdk/pkg/tools/monitorconnection/authorize"
	"github.com/networkservicemesh/sdk/pkg/tools/sandbox"
	"github.com/networkservicemesh/sdk/pkg/tools/spiffejwt"
	"github.com/networkservicemesh/sdk/pkg/tools/token"
)

// The policy files NSM's commands default to (embedded in the sdk).
var (
	registryServerPolicies = []string{"etc/nsm/opa/common/.*.rego", "etc/nsm/opa/registry/.*.rego", "etc/nsm/opa/server/.*.rego"}
	registryClientPolicies = []string{"etc/nsm/opa/common/.*.rego", "etc/nsm/opa/registry/.*.rego", "etc/nsm/opa/client/.*.rego"}
)

// security is one role's identity: an X.509-SVID with its trust bundle, or
// the sdk sandbox's insecure mode.
type security struct {
	insecure bool
	svid     x509svid.Source
	bundle   x509bundle.Source
	lifetime time.Duration
	close    func()
	conns    *genericsync.Map[spiffeid.ID, *genericsync.Map[string, struct{}]]
}

// files is an SVID read once from PEM files (the tests do not rotate here).
type files struct {
	svid *x509svid.SVID
}

func (f files) GetX509SVID() (*x509svid.SVID, error) { return f.svid, nil }

func newSecurity(ctx context.Context) (*security, error) {
	lifetime, err := envDuration("NSM_MAX_TOKEN_LIFETIME", "10m")
	if err != nil {
		return nil, err
	}
	s := &security{
		lifetime: lifetime,
		close:    func() {},
		conns:    &genericsync.Map[spiffeid.ID, *genericsync.Map[string, struct{}]]{},
	}
	switch {
	case env("NSM_INSECURE", "false") == "true":
		s.insecure = true
		log.FromContext(ctx).Warn("NSM_INSECURE=true: the sdk sandbox's insecure mode (no TLS, test tokens, policies off)")
		return s, nil
	case env("SPIFFE_ENDPOINT_SOCKET", "") != "":
		src, err := workloadapi.NewX509Source(ctx)
		if err != nil {
			return nil, fmt.Errorf("the Workload API at SPIFFE_ENDPOINT_SOCKET: %w", err)
		}
		s.svid, s.bundle, s.close = src, src, func() { _ = src.Close() }
	case env("NSM_SVID_CERT_FILE", "") != "":
		svid, err := x509svid.Load(env("NSM_SVID_CERT_FILE", ""), env("NSM_SVID_KEY_FILE", ""))
		if err != nil {
			return nil, fmt.Errorf("NSM_SVID_CERT_FILE/NSM_SVID_KEY_FILE: %w", err)
		}
		bundle, err := x509bundle.Load(svid.ID.TrustDomain(), env("NSM_TRUST_BUNDLE_FILE", ""))
		if err != nil {
			return nil, fmt.Errorf("NSM_TRUST_BUNDLE_FILE: %w", err)
		}
		s.svid, s.bundle = files{svid}, bundle
	default:
		return nil, fmt.Errorf("no identity: set SPIFFE_ENDPOINT_SOCKET, NSM_SVID_CERT_FILE (+ _KEY_, NSM_TRUST_BUNDLE_FILE) or NSM_INSECURE=true")
	}
	svid, err := s.svid.GetX509SVID()
	if err != nil {
		return nil, err
	}
	log.FromContext(ctx).Infof("SVID: %q", svid.ID)
	return s, nil
}

// tokens signs path tokens with the SVID's key (NSM's spiffejwt), or makes
// the sandbox's test tokens.
func (s *security) tokens() token.GeneratorFunc {
	if s.insecure {
		return sandbox.GenerateExpiringToken(s.lifetime)
	}
	return spiffejwt.TokenGeneratorFunc(s.svid, s.lifetime)
}

func (s *security) serverCreds() grpc.ServerOption {
	if s.insecure {
		return grpc.Creds(grpcfd.TransportCredentials(insecure.NewCredentials()))
	}
	c := tlsconfig.MTLSServerConfig(s.svid, s.bundle, tlsconfig.AuthorizeAny())
	c.MinVersion = tls.VersionTLS12
	return grpc.Creds(grpcfd.TransportCredentials(credentials.NewTLS(c)))
}

// dialOptions are what NSM's commands dial the next hop with: grpcfd over
// mTLS, a fresh signed token per call.
func (s *security) dialOptions() []grpc.DialOption {
	if s.insecure {
		return sandbox.DialOptions(sandbox.WithTokenGenerator(s.tokens()))
	}
	c := tlsconfig.MTLSClientConfig(s.svid, s.bundle, tlsconfig.AuthorizeAny())
	c.MinVersion = tls.VersionTLS12
	return []grpc.DialOption{
		grpc.WithTransportCredentials(grpcfd.TransportCredentials(credentials.NewTLS(c))),
		grpc.WithDefaultCallOptions(
			grpc.WaitForReady(true),
			grpc.PerRPCCredentials(token.NewPerRPCCredentials(s.tokens())),
		),
		grpcfd.WithChainStreamInterceptor(),
		grpcfd.WithChainUnaryInterceptor(),
	}
}

func (s *security) authorizeServer() networkservice.NetworkServiceServer {
	if s.insecure {
		return authorize.NewServer(authorize.Any())
	}
	return authorize.NewServer(authorize.WithSpiffeIDConnectionMap(s.conns))
}

func (s *security) authorizeMonitor() networkservice.MonitorConnectionServer {
	if s.insecure {
		return authmonitor.NewMonitorConnectionServer(authmonitor.Any())
	}
	return authmonitor.NewMonitorConnectionServer(authmonitor.WithSpiffeIDConnectionMap(s.conns))
}

func (s *security) authorizeClient() networkservice.NetworkServiceClient {
	if s.insecure {
		return authorize.NewClient(authorize.Any())
	}
	return authorize.NewClient()
}

func (s *security) registryServerPolicies() registryauthorize.Option {
	if s.insecure {
		return registryauthorize.Any()
	}
	return registryauthorize.WithPolicies(registryServerPolicies...)
}

func (s *security) registryClientPolicies() registryauthorize.Option {
	if s.insecure {
		return registryauthorize.Any()
	}
	return registryauthorize.WithPolicies(registryClientPolicies...)
}
