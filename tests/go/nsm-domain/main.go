// Command nsm-domain runs NSM's own control plane for our interop tests
// (tests/tests/nsm_interop.rs), built from NSM's published sdk: the
// registry (sdk's memory registry chain), the manager (sdk's nsmgr chain)
// and a client (sdk's client chain with the mechanisms NSM's cmd-nsc-init
// and cmd-nsc use). It is what cmd-registry-memory, cmd-nsmgr and cmd-nsc
// run, wired by us because those commands are not on the Go module proxy.
//
// One role per process, configured with the NSM_* variables of NSM's own
// commands:
//
//	nsm-domain registry   NSM_LISTEN_ON
//	nsm-domain nsmgr      NSM_NAME NSM_LISTEN_ON NSM_REGISTRY_URL NSM_DIAL_TIMEOUT
//	nsm-domain nsc        NSM_NAME NSM_CONNECT_TO NSM_NETWORK_SERVICES NSM_REQUEST_TIMEOUT
//
// and, for all, NSM_MAX_TOKEN_LIFETIME, NSM_LOG_LEVEL and the identity:
// SPIFFE_ENDPOINT_SOCKET (the Workload API, as NSM's commands use) or
// NSM_SVID_CERT_FILE, NSM_SVID_KEY_FILE, NSM_TRUST_BUNDLE_FILE (PEM files),
// or NSM_INSECURE=true: the sdk sandbox's insecure mode (no TLS, test
// tokens, every policy allows).
//
// Secure roles enforce NSM's shipped policies: nsmgr and the registry are
// given the same policy files cmd-nsmgr and cmd-registry-memory default to,
// the client authorizes its path as cmd-nsc-init does.
//
// The client prints one JSON line per event on stdout for the test to read:
// {"event":"request","connection":{...}} after every Request that passes its
// chain (the first, each refresh, each heal), {"event":"error",...} when one
// fails, {"event":"closed"} after SIGTERM made it Close.
package main

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/networkservicemesh/sdk/pkg/tools/log"
	"github.com/networkservicemesh/sdk/pkg/tools/log/logruslogger"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: nsm-domain registry|nsmgr|nsc (configured by NSM_* variables; see the source's header)")
		os.Exit(64)
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()

	level, err := logrus.ParseLevel(env("NSM_LOG_LEVEL", "INFO"))
	if err != nil {
		fail("NSM_LOG_LEVEL: %v", err)
	}
	logrus.SetLevel(level)
	logrus.SetOutput(os.Stderr)
	// As NSM's commands do: chain elements trace at TRACE level.
	log.EnableTracing(true)
	ctx = log.WithLog(ctx, logruslogger.New(ctx, map[string]interface{}{"cmd": os.Args[1]}))

	sec, err := newSecurity(ctx)
	if err != nil {
		fail("identity: %v", err)
	}
	defer sec.close()

	switch os.Args[1] {
	case "registry":
		err = runRegistry(ctx, sec)
	case "nsmgr":
		err = runNsmgr(ctx, sec)
	case "nsc":
		err = runClient(ctx, sec)
	default:
		fail("unknown role %q: registry, nsmgr or nsc", os.Args[1])
	}
	if err != nil {
		fail("%s: %v", os.Args[1], err)
	}
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "nsm-domain: "+format+"\n", args...)
	os.Exit(1)
}

func env(key, def string) string {
	if v, ok := os.LookupEnv(key); ok && v != "" {
		return v
	}
	return def
}

func envURL(key, def string) (*url.URL, error) {
	u, err := url.Parse(env(key, def))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	return u, nil
}

func envURLs(key, def string) ([]*url.URL, error) {
	var out []*url.URL
	for _, s := range strings.Split(env(key, def), ",") {
		u, err := url.Parse(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", key, err)
		}
		out = append(out, u)
	}
	return out, nil
}

func envDuration(key, def string) (time.Duration, error) {
	d, err := time.ParseDuration(env(key, def))
	if err != nil {
		return 0, fmt.Errorf("%s: %w", key, err)
	}
	return d, nil
}
