package main

import (
	"context"
	"fmt"
	"net/url"
	"time"

	"google.golang.org/grpc"

	"github.com/networkservicemesh/sdk/pkg/networkservice/chains/nsmgr"
	"github.com/networkservicemesh/sdk/pkg/registry/chains/memory"
	registryauthorize "github.com/networkservicemesh/sdk/pkg/registry/common/authorize"
	"github.com/networkservicemesh/sdk/pkg/tools/grpcutils"
	"github.com/networkservicemesh/sdk/pkg/tools/log"
)

// runRegistry is cmd-registry-memory: sdk's in-memory registry with NSM's
// registry policies (a name stays with the identity that registered it).
func runRegistry(ctx context.Context, sec *security) error {
	listen, err := envURLs("NSM_LISTEN_ON", "unix:///var/lib/networkservicemesh/registry.sock")
	if err != nil {
		return err
	}
	expiry, err := envDuration("NSM_REGISTRY_EXPIRY", "1m")
	if err != nil {
		return err
	}
	server := grpc.NewServer(sec.serverCreds())
	memory.NewServer(ctx, sec.tokens(),
		memory.WithAuthorizeNSERegistryServer(registryauthorize.NewNetworkServiceEndpointRegistryServer(sec.registryServerPolicies())),
		memory.WithAuthorizeNSERegistryClient(registryauthorize.NewNetworkServiceEndpointRegistryClient(sec.registryClientPolicies())),
		memory.WithAuthorizeNSRegistryServer(registryauthorize.NewNetworkServiceRegistryServer(sec.registryServerPolicies())),
		memory.WithAuthorizeNSRegistryClient(registryauthorize.NewNetworkServiceRegistryClient(sec.registryClientPolicies())),
		memory.WithDefaultExpiration(expiry),
		memory.WithDialOptions(append(sec.dialOptions(), grpc.WithBlock())...),
	).Register(server)
	return serve(ctx, listen, server)
}

// runNsmgr is cmd-nsmgr: sdk's nsmgr chain (forwarder selection, discovery,
// heal, NSM's authorization) serving the node's clients, forwarders and
// endpoints, registering through the registry at NSM_REGISTRY_URL.
func runNsmgr(ctx context.Context, sec *security) error {
	listen, err := envURLs("NSM_LISTEN_ON", "unix:///var/lib/networkservicemesh/nsm.io.sock")
	if err != nil {
		return err
	}
	registry, err := envURL("NSM_REGISTRY_URL", "unix:///var/lib/networkservicemesh/registry.sock")
	if err != nil {
		return err
	}
	dialTimeout, err := envDuration("NSM_DIAL_TIMEOUT", "750ms")
	if err != nil {
		return err
	}
	mgr := nsmgr.NewServer(ctx, sec.tokens(),
		nsmgr.WithName(env("NSM_NAME", "nsmgr")),
		nsmgr.WithURL(listen[0].String()),
		nsmgr.WithRegistry(registry),
		nsmgr.WithAuthorizeServer(sec.authorizeServer()),
		nsmgr.WithAuthorizeMonitorConnectionServer(sec.authorizeMonitor()),
		nsmgr.WithAuthorizeNSERegistryServer(registryauthorize.NewNetworkServiceEndpointRegistryServer(sec.registryServerPolicies())),
		nsmgr.WithAuthorizeNSERegistryClient(registryauthorize.NewNetworkServiceEndpointRegistryClient(sec.registryClientPolicies())),
		nsmgr.WithAuthorizeNSRegistryServer(registryauthorize.NewNetworkServiceRegistryServer(sec.registryServerPolicies())),
		nsmgr.WithAuthorizeNSRegistryClient(registryauthorize.NewNetworkServiceRegistryClient(sec.registryClientPolicies())),
		nsmgr.WithDialTimeout(dialTimeout),
		nsmgr.WithForwarderServiceName(env("NSM_FORWARDER_NETWORK_SERVICE_NAME", "forwarder")),
		nsmgr.WithDialOptions(append(sec.dialOptions(), grpc.WithBlock())...),
	)
	server := grpc.NewServer(sec.serverCreds())
	mgr.Register(server)
	return serve(ctx, listen, server)
}

// serve listens on every URL until ctx ends or a listener fails.
func serve(ctx context.Context, listen []*url.URL, server *grpc.Server) error {
	errs := make(chan error, len(listen))
	for _, u := range listen {
		ch := grpcutils.ListenAndServe(ctx, u, server)
		go func(u *url.URL) {
			if err, ok := <-ch; ok && err != nil {
				errs <- fmt.Errorf("serving %s: %w", u, err)
			}
		}(u)
		log.FromContext(ctx).Infof("listening on %s", u)
	}
	select {
	case <-ctx.Done():
		stopped := make(chan struct{})
		go func() { server.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(2 * time.Second):
			server.Stop()
		}
		return nil
	case err := <-errs:
		return err
	}
}
