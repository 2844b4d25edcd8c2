package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/golang/protobuf/ptypes/empty"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/networkservicemesh/api/pkg/api/networkservice"
	kernelmech "github.com/networkservicemesh/api/pkg/api/networkservice/mechanisms/kernel"
	"github.com/networkservicemesh/sdk/pkg/networkservice/chains/client"
	"github.com/networkservicemesh/sdk/pkg/networkservice/common/clientinfo"
	"github.com/networkservicemesh/sdk/pkg/networkservice/common/excludedprefixes"
	"github.com/networkservicemesh/sdk/pkg/networkservice/common/heal"
	"github.com/networkservicemesh/sdk/pkg/networkservice/common/mechanisms"
	"github.com/networkservicemesh/sdk/pkg/networkservice/common/mechanisms/kernel"
	"github.com/networkservicemesh/sdk/pkg/networkservice/common/mechanisms/sendfd"
	"github.com/networkservicemesh/sdk/pkg/networkservice/core/next"
	"github.com/networkservicemesh/sdk/pkg/tools/nsurl"
)

// runClient is cmd-nsc: sdk's client chain (refresh, heal, NSM's client
// authorization) with the kernel mechanism and sendfd of cmd-nsc-init,
// run inside the client's network namespace. It requests each of
// NSM_NETWORK_SERVICES, keeps the connections (refreshing and healing them)
// until SIGTERM, then closes them.
func runClient(ctx context.Context, sec *security) error {
	connectTo, err := envURL("NSM_CONNECT_TO", "unix:///var/lib/networkservicemesh/nsm.io.sock")
	if err != nil {
		return err
	}
	services, err := envURLs("NSM_NETWORK_SERVICES", "")
	if err != nil || services[0].String() == "" {
		return fmt.Errorf("NSM_NETWORK_SERVICES: a list of URLs such as kernel://mesh-proxy/nsm-1 is required")
	}
	dialTimeout, err := envDuration("NSM_DIAL_TIMEOUT", "5s")
	if err != nil {
		return err
	}
	requestTimeout, err := envDuration("NSM_REQUEST_TIMEOUT", "15s")
	if err != nil {
		return err
	}
	name := env("NSM_NAME", "nsc")

	// The chain lives past SIGTERM (ctx), so that it can still Close.
	chainCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	defer stop()
	nsc := client.NewClient(chainCtx,
		client.WithName(name),
		client.WithClientURL(connectTo),
		client.WithAuthorizeClient(sec.authorizeClient()),
		client.WithHealClient(heal.NewClient(chainCtx)),
		client.WithAdditionalFunctionality(
			&eventClient{},
			clientinfo.NewClient(),
			mechanisms.NewClient(map[string]networkservice.NetworkServiceClient{
				kernelmech.MECHANISM: kernel.NewClient(),
			}),
			sendfd.NewClient(),
			excludedprefixes.NewClient(),
		),
		client.WithDialTimeout(dialTimeout),
		client.WithDialOptions(sec.dialOptions()...),
	)

	var conns []*networkservice.Connection
	for i, u := range services {
		ns := (*nsurl.NSURL)(u)
		req := &networkservice.NetworkServiceRequest{
			Connection: &networkservice.Connection{
				Id:             fmt.Sprintf("%s-%d", name, i),
				NetworkService: ns.NetworkService(),
				Labels:         ns.Labels(),
			},
			MechanismPreferences: []*networkservice.Mechanism{ns.Mechanism()},
		}
		reqCtx, cancel := context.WithTimeout(chainCtx, requestTimeout)
		conn, err := nsc.Request(reqCtx, req)
		cancel()
		if err != nil {
			return fmt.Errorf("request %s: %w", u, err)
		}
		conns = append(conns, conn)
	}
	emit(map[string]interface{}{"event": "ready"})

	<-ctx.Done()
	var failed error
	for _, conn := range conns {
		closeCtx, cancel := context.WithTimeout(chainCtx, requestTimeout)
		if _, err := nsc.Close(closeCtx, conn); err != nil {
			failed = fmt.Errorf("close %s: %w", conn.GetId(), err)
		}
		cancel()
	}
	if failed != nil {
		return failed
	}
	emit(map[string]interface{}{"event": "closed"})
	return nil
}

// eventClient reports each Request that passes the chain (first, refresh,
// heal) and each Close on stdout.
type eventClient struct{}

func (e *eventClient) Request(ctx context.Context, req *networkservice.NetworkServiceRequest, opts ...grpc.CallOption) (*networkservice.Connection, error) {
	conn, err := next.Client(ctx).Request(ctx, req, opts...)
	if err != nil {
		emit(map[string]interface{}{"event": "error", "id": req.GetConnection().GetId(), "error": err.Error()})
		return nil, err
	}
	raw, merr := protojson.Marshal(conn)
	if merr != nil {
		return conn, err
	}
	emit(map[string]interface{}{"event": "request", "connection": json.RawMessage(raw)})
	return conn, nil
}

func (e *eventClient) Close(ctx context.Context, conn *networkservice.Connection, opts ...grpc.CallOption) (*empty.Empty, error) {
	r, err := next.Client(ctx).Close(ctx, conn, opts...)
	emit(map[string]interface{}{"event": "close", "id": conn.GetId(), "ok": err == nil})
	return r, err
}

var stdout sync.Mutex

func emit(v map[string]interface{}) {
	v["at"] = time.Now().UTC().Format(time.RFC3339Nano)
	line, _ := json.Marshal(v)
	stdout.Lock()
	defer stdout.Unlock()
	_, _ = os.Stdout.Write(append(line, '\n'))
}
