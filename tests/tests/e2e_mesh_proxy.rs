//! End to end, as the local demo runs it (examples/src/lab.rs): client
//! namespaces running nsc-init against `forwarder-plugin serve`, which
//! plumbs them to `mesh-proxy-nse`, whose namespace holds the mesh proxy
//! (HAProxy or our transparent-proxy, uid 1337) and the link to a server.
//! The tests assert where traffic landed (the proxy's log, the address the
//! server saw), what each namespace holds, and that Close leaves nothing.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use examples::inspect::{self, NsState};
use examples::lab::{
    Lab, LabConfig, NSE_UPLINK, STATIC_CLIENT_IP, STATIC_CLIENT_LINK, server_addr,
};
use examples::namespace::Namespace;
use examples::nsc::{self, NscOptions, Up, exit};
use examples::process::Process;
use examples::proxy::ProxyKind;
use examples::traffic::http_get;

const IO_TIMEOUT: Duration = Duration::from_secs(5);
const UP_TIMEOUT: Duration = Duration::from_secs(30);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(15);

fn lab_config(proxy: ProxyKind) -> LabConfig {
    LabConfig {
        proxy,
        ..Default::default()
    }
}

/// The data path alone: a static client behind the nse namespace reaches
/// the server directly (the server sees the client), and once a NAT
/// REDIRECT rule sends its TCP to :15001 it reaches the server through the
/// proxy (the proxy logs the original destination, the server sees the
/// nse namespace's address).
fn proxy_forwards_to_the_original_destination(kind: ProxyKind) {
    let lab = Lab::data_path(lab_config(kind)).unwrap_or_else(|e| panic!("{e}"));
    let client = lab.client().unwrap();
    lab.attach_static_client(&client).unwrap();

    let direct = http_get(&client, server_addr(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("direct request: {e}{}", lab.logs()));
    assert_eq!(
        direct.server_saw.ip(),
        STATIC_CLIENT_IP,
        "without rules the server sees the client"
    );
    assert_eq!(
        lab.proxy_saw(direct.local),
        None,
        "without rules the proxy sees nothing"
    );

    for cmd in [
        "add table ip e2e_redirect".to_owned(),
        "add chain ip e2e_redirect pre { type nat hook prerouting priority dstnat ; }".to_owned(),
        format!(
            "add rule ip e2e_redirect pre iifname {STATIC_CLIENT_LINK} tcp dport 8080 redirect to :15001"
        ),
    ] {
        let mut argv = vec!["nft"];
        argv.extend(cmd.split_whitespace());
        lab.nse_ns.exec(&argv).unwrap();
    }

    let proxied = http_get(&client, server_addr(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("redirected request: {e}{}", lab.logs()));
    assert_eq!(
        proxied.server_saw.ip(),
        NSE_UPLINK,
        "behind the proxy the server sees the nse namespace's address{}",
        lab.logs()
    );
    // The proxy logs as it connects; give its log a moment.
    let saw = (0..100)
        .find_map(|_| {
            lab.proxy_saw(proxied.local).or_else(|| {
                std::thread::sleep(Duration::from_millis(20));
                None
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "the proxy logged no line for {}{}",
                proxied.local,
                lab.logs()
            )
        });
    assert_eq!(
        saw,
        server_addr(),
        "the proxy connected to the original destination"
    );
}

#[test]
fn builtin_proxy_forwards_to_the_original_destination() {
    if !nsm_tests::require_root("builtin_proxy_forwards_to_the_original_destination") {
        return;
    }
    proxy_forwards_to_the_original_destination(ProxyKind::Builtin);
}

#[test]
fn haproxy_forwards_to_the_original_destination() {
    let name = "haproxy_forwards_to_the_original_destination";
    if !nsm_tests::require_root(name) || !nsm_tests::require_tool(name, "haproxy") {
        return;
    }
    proxy_forwards_to_the_original_destination(ProxyKind::Haproxy);
}

fn start(proxy: ProxyKind) -> Lab {
    Lab::start(lab_config(proxy)).unwrap_or_else(|e| panic!("lab: {e}"))
}

/// A client namespace with nsc-init --watch up in it.
struct Connected {
    client: Namespace,
    nsc: Process,
    up: Up,
}

fn connect(lab: &Lab, opts: &NscOptions, log: &str) -> Connected {
    let client = lab.client().unwrap();
    let (nsc, up) = nsc::watch(&client, opts, &lab.dir.join(log), UP_TIMEOUT)
        .unwrap_or_else(|e| panic!("nsc-init --watch: {e}{}", lab.logs()));
    Connected { client, nsc, up }
}

fn snapshot(ns: &Namespace) -> NsState {
    inspect::snapshot(ns).unwrap_or_else(|e| panic!("snapshot of {}: {e}", ns.name()))
}

/// What the last Close leaves in the endpoint's namespace: nothing but the
/// NSE's idle redirect table (see `inspect::diff_but_idle_nse_table`).
#[track_caller]
fn assert_only_the_idle_table(lab: &Lab, before: &NsState, after: &NsState) {
    let left = examples::inspect::diff_but_idle_nse_table(&lab.nse_ns, before, after)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        left,
        Vec::<String>::new(),
        "Close left nothing in the endpoint namespace but the NSE's idle table"
    );
}

/// A request from `client` reaches the server through the proxy: it leaves
/// from the client's NSM address, the proxy logs its original destination,
/// and the server sees the endpoint namespace's address.
fn assert_through_proxy(lab: &Lab, client: &Namespace, up: &Up) {
    let ex = http_get(client, server_addr(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("request from {}: {e}{}", client.name(), lab.logs()));
    assert_eq!(
        Some(ex.local.ip()),
        up.src_ip(),
        "the request leaves from the client's {} address",
        up.iface
    );
    assert_eq!(
        ex.server_saw.ip(),
        IpAddr::V4(NSE_UPLINK),
        "the server sees the endpoint namespace's address, not the client's{}",
        lab.logs()
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    let saw = loop {
        match lab.proxy_saw(ex.local) {
            Some(d) => break d,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => panic!("the proxy logged nothing for {}{}", ex.local, lab.logs()),
        }
    };
    assert_eq!(
        saw,
        server_addr(),
        "the proxy connected to the original destination"
    );
}

/// Request → interface, addresses and routes in both namespaces → traffic
/// through the proxy → SIGTERM → Close leaves both namespaces as they were.
fn request_traffic_close(kind: ProxyKind) {
    let lab = start(kind);
    let client = lab.client().unwrap();
    let (client_before, nse_before) = (snapshot(&client), snapshot(&lab.nse_ns));
    let opts = lab.nsc_options("e2e");
    let (mut nsc, up) = nsc::watch(&client, &opts, &lab.dir.join("nsc.log"), UP_TIMEOUT)
        .unwrap_or_else(|e| panic!("nsc-init --watch: {e}{}", lab.logs()));
    assert_eq!(up.iface, "nsm-1", "the interface the URL named");
    assert!(
        !up.src.is_empty() && !up.dst.is_empty(),
        "addresses on both ends: {up:?}"
    );

    // Client side: the interface, up, with the client's addresses and routes through it.
    let link = inspect::link(&client, &up.iface)
        .unwrap()
        .expect("nsm-1 in the client");
    assert!(link.up, "nsm-1 is up");
    let addrs = inspect::addresses(&client, &up.iface).unwrap();
    for a in &up.src {
        assert!(addrs.contains(a), "client address {a} on nsm-1: {addrs:?}");
    }
    assert!(
        !inspect::routes_via(&client, &up.iface).unwrap().is_empty(),
        "the client has routes through nsm-1"
    );

    // Endpoint side: exactly one new link, with the endpoint's addresses.
    let nse_up = snapshot(&lab.nse_ns);
    let new: Vec<&String> = nse_up.links.difference(&nse_before.links).collect();
    assert_eq!(
        new.len(),
        1,
        "one endpoint-side link: {:?}",
        nse_before.diff(&nse_up)
    );
    let nse_addrs = inspect::addresses(&lab.nse_ns, new[0]).unwrap();
    for a in &up.dst {
        assert!(
            nse_addrs.contains(a),
            "endpoint address {a} on {}: {nse_addrs:?}",
            new[0]
        );
    }
    assert!(
        nse_up.has_nft_tables(),
        "the endpoint's namespace has redirect rules: {:?}",
        nse_up.nft
    );

    for _ in 0..3 {
        assert_through_proxy(&lab, &client, &up);
    }

    let status = nsc
        .terminate(CLOSE_TIMEOUT)
        .expect("nsc-init exits after SIGTERM");
    assert!(
        status.success(),
        "nsc-init Closed and exited 0: {status}; {}",
        nsc.tail()
    );
    let (client_after, nse_after) = (snapshot(&client), snapshot(&lab.nse_ns));
    assert_eq!(
        client_before.diff(&client_after),
        Vec::<String>::new(),
        "Close left nothing in the client namespace"
    );
    assert_only_the_idle_table(&lab, &nse_before, &nse_after);
}

#[test]
fn request_traffic_close_builtin_proxy() {
    if !nsm_tests::require_root("request_traffic_close_builtin_proxy") {
        return;
    }
    request_traffic_close(ProxyKind::Builtin);
}

#[test]
fn request_traffic_close_haproxy() {
    let name = "request_traffic_close_haproxy";
    if !nsm_tests::require_root(name) || !nsm_tests::require_tool(name, "haproxy") {
        return;
    }
    request_traffic_close(ProxyKind::Haproxy);
}

/// A pod has a default route of its own (via eth0). The capture routes
/// (everything, as 0.0.0.0/1 and 128.0.0.0/1 via the endpoint) go in beside
/// it without replacing it, win over it (longer prefixes), so traffic still
/// goes through the proxy, and Close leaves the pod's route as it was.
#[test]
fn the_clients_default_route_stays_and_traffic_still_reaches_the_proxy() {
    if !nsm_tests::require_root(
        "the_clients_default_route_stays_and_traffic_still_reaches_the_proxy",
    ) {
        return;
    }
    let lab = start(ProxyKind::Builtin);
    let client = lab.client().unwrap();
    // The pod's own network: a default route via eth0, here one end of a
    // veth pair whose other end stays in the pod too, so nothing routed
    // that way could reach the server.
    for cmd in [
        "link add eth0 type veth peer name eth0-peer",
        "link set eth0 addrgenmode none",
        "link set eth0-peer addrgenmode none",
        "addr add 198.19.3.2/24 dev eth0",
        "link set eth0-peer up",
        "link set eth0 up",
        "route add default via 198.19.3.1 dev eth0",
    ] {
        client.ip(cmd).unwrap();
    }
    let before = snapshot(&client);
    let pod_default = "default via 198.19.3.1 dev eth0";
    assert!(before.routes.iter().any(|r| r == pod_default), "{before:?}");

    let opts = lab.nsc_options("dflt");
    let (mut nsc, up) = nsc::watch(&client, &opts, &lab.dir.join("nsc.log"), UP_TIMEOUT)
        .unwrap_or_else(|e| panic!("nsc-init --watch: {e}{}", lab.logs()));
    let routes = client.exec(&["ip", "-4", "route", "show"]).unwrap();
    let main: Vec<&str> = routes.lines().map(str::trim).collect();
    assert!(
        main.contains(&pod_default),
        "the pod's default route stays: {routes}"
    );
    for half in ["0.0.0.0/1", "128.0.0.0/1"] {
        assert!(
            main.iter()
                .any(|r| r.starts_with(&format!("{half} via ")) && r.contains(&up.iface)),
            "{half} via the endpoint on {}: {routes}",
            up.iface
        );
    }
    assert_through_proxy(&lab, &client, &up);

    let status = nsc.terminate(CLOSE_TIMEOUT).unwrap();
    assert!(status.success(), "{status}: {}", nsc.tail());
    assert_eq!(
        before.diff(&snapshot(&client)),
        Vec::<String>::new(),
        "Close left the pod's own routes as they were"
    );
}

/// With a 3s token lifetime, --watch refreshes about every second; after
/// three lifetimes the connection is the same one (same interface index,
/// never re-requested from scratch) and still carries traffic through the
/// proxy. Without refreshes the endpoint would have expired it.
#[test]
fn refresh_keeps_the_connection() {
    if !nsm_tests::require_root("refresh_keeps_the_connection") {
        return;
    }
    let lab = start(ProxyKind::Builtin);
    let mut opts = lab.nsc_options("refresh");
    opts.token_lifetime = Some("3s".into());
    // Hops close a connection at its expiry minus the Request's timeout
    // (sdk's timeout), so the timeout must be well below the lifetime.
    opts.request_timeout = "1s".into();
    opts.log_level = "DEBUG".into();
    let mut c = connect(&lab, &opts, "nsc.log");
    let index = inspect::link(&c.client, &c.up.iface)
        .unwrap()
        .expect("nsm-1")
        .index;

    let until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            c.nsc.try_status().is_none(),
            "nsc-init --watch still runs: {}",
            c.nsc.tail()
        );
        let link = inspect::link(&c.client, &c.up.iface).unwrap();
        assert_eq!(
            link.map(|l| l.index),
            Some(index),
            "nsm-1 keeps its index across refreshes{}",
            lab.logs()
        );
    }
    let log = c.nsc.log();
    let refreshed = log.lines().filter(|l| l.contains("refreshed")).count();
    assert!(
        refreshed >= 3,
        "at least 3 refreshes in 9s with a 3s lifetime, saw {refreshed}: {log}"
    );
    assert!(
        !log.contains("re-requested from scratch"),
        "no refresh was refused: {log}"
    );
    let addrs = inspect::addresses(&c.client, &c.up.iface).unwrap();
    for a in &c.up.src {
        assert!(addrs.contains(a), "client address {a} kept: {addrs:?}");
    }
    assert_through_proxy(&lab, &c.client, &c.up);
    let status = c.nsc.terminate(CLOSE_TIMEOUT).unwrap();
    assert!(status.success(), "{status}: {}", c.nsc.tail());
    assert!(
        inspect::link(&c.client, &c.up.iface).unwrap().is_none(),
        "Close removed nsm-1"
    );
}

/// A one-shot run (the init container) exits 0 once the interface is up
/// with its addresses; the connection stays after it exits.
#[test]
fn exit_code_success() {
    if !nsm_tests::require_root("exit_code_success") {
        return;
    }
    let lab = start(ProxyKind::Builtin);
    let client = lab.client().unwrap();
    let run = nsc::run(&client, &lab.nsc_options("once")).unwrap();
    assert_eq!(run.code(), Some(exit::OK), "{}{}", run.stderr, lab.logs());
    let ups = run.ups();
    assert_eq!(ups.len(), 1, "one up line: {}", run.stdout);
    let link = inspect::link(&client, &ups[0].iface)
        .unwrap()
        .expect("nsm-1 after exit");
    assert!(link.up);
    let addrs = inspect::addresses(&client, &ups[0].iface).unwrap();
    assert!(
        ups[0].src.iter().all(|a| addrs.contains(a)),
        "{ups:?} vs {addrs:?}"
    );
    assert_through_proxy(&lab, &client, &ups[0]);
}

/// nsc-init/README.md: ids are `<NSM_NAME>-<i>`, "stable, so a restarted
/// init container refreshes instead of duplicating". A second run with the
/// same name in the same namespace gets the same connection (same
/// interface, one endpoint-side link), and Closing it leaves nothing.
#[test]
fn rerun_with_the_same_name_refreshes() {
    if !nsm_tests::require_root("rerun_with_the_same_name_refreshes") {
        return;
    }
    let lab = start(ProxyKind::Builtin);
    let client = lab.client().unwrap();
    let nse_before = snapshot(&lab.nse_ns);
    let opts = lab.nsc_options("again");
    let run = nsc::run(&client, &opts).unwrap();
    assert_eq!(run.code(), Some(exit::OK), "{}{}", run.stderr, lab.logs());
    let first = run.ups().pop().expect("an up line");
    let index = inspect::link(&client, &first.iface)
        .unwrap()
        .expect("nsm-1")
        .index;

    // The pod's init container runs again: same ids.
    let (mut nsc, up) = nsc::watch(&client, &opts, &lab.dir.join("nsc.log"), UP_TIMEOUT)
        .unwrap_or_else(|e| panic!("second run: {e}{}", lab.logs()));
    assert_eq!(up.src, first.src, "the same addresses");
    assert_eq!(
        inspect::link(&client, &up.iface).unwrap().map(|l| l.index),
        Some(index),
        "the same interface"
    );
    let nse_links = snapshot(&lab.nse_ns).links;
    assert_eq!(
        nse_links.difference(&nse_before.links).count(),
        1,
        "still one endpoint-side link"
    );
    let status = nsc.terminate(CLOSE_TIMEOUT).unwrap();
    assert!(status.success(), "{status}: {}", nsc.tail());
    assert_only_the_idle_table(&lab, &nse_before, &snapshot(&lab.nse_ns));
}

/// Nothing listens at NSM_CONNECT_TO: exit 3 after NSM_REQUEST_TIMEOUT,
/// with a reason naming the socket, and nothing in the client namespace.
#[test]
fn exit_code_unreachable_manager() {
    if !nsm_tests::require_root("exit_code_unreachable_manager") {
        return;
    }
    let dir = examples::process::WorkDir::create().unwrap();
    let client = Namespace::create("mp-client").unwrap();
    let before = snapshot(&client);
    let sock = dir.join("nobody.sock");
    let mut opts = NscOptions::new(&format!("unix://{}", sock.display()), "unreach");
    opts.request_timeout = "1s".into();
    let run = nsc::run(&client, &opts).unwrap();
    assert_eq!(run.code(), Some(exit::UNREACHABLE), "{}", run.stderr);
    assert!(
        run.reason().contains("nobody.sock") && run.reason().contains("unreachable"),
        "{}",
        run.reason()
    );
    assert_eq!(before.diff(&snapshot(&client)), Vec::<String>::new());
}

/// A manager that accepts the connection but never answers: nsc-init gives
/// up after NSM_REQUEST_TIMEOUT (not before, and not much later) with exit 3.
#[test]
fn exit_code_timeout_on_a_silent_manager() {
    if !nsm_tests::require_root("exit_code_timeout_on_a_silent_manager") {
        return;
    }
    let dir = examples::process::WorkDir::create().unwrap();
    let sock = dir.join("silent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    // Accepts and holds every connection, says nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    let client = Namespace::create("mp-client").unwrap();
    let mut opts = NscOptions::new(&format!("unix://{}", sock.display()), "silent");
    opts.request_timeout = "2s".into();
    let run = nsc::run(&client, &opts).unwrap();
    assert_eq!(run.code(), Some(exit::UNREACHABLE), "{}", run.stderr);
    assert!(
        run.elapsed >= Duration::from_secs(2),
        "waited the whole timeout: {:?}",
        run.elapsed
    );
    assert!(
        run.elapsed < Duration::from_secs(12),
        "did not hang: {:?}",
        run.elapsed
    );
    assert!(run.reason().contains("silent.sock"), "{}", run.reason());
}

/// A service the endpoint does not provide is refused (exit 1, the reason
/// names the service) and nothing is plumbed anywhere.
#[test]
fn exit_code_unknown_service() {
    if !nsm_tests::require_root("exit_code_unknown_service") {
        return;
    }
    let lab = start(ProxyKind::Builtin);
    let client = lab.client().unwrap();
    let before = (snapshot(&client), snapshot(&lab.nse_ns));
    let mut opts = lab.nsc_options("unknown");
    opts.services = "kernel://no-such-service/nsm-1".into();
    opts.request_timeout = "3s".into();
    let run = nsc::run(&client, &opts).unwrap();
    assert_eq!(
        run.code(),
        Some(exit::REFUSED),
        "{}{}",
        run.stderr,
        lab.logs()
    );
    assert!(run.reason().contains("no-such-service"), "{}", run.reason());
    assert_eq!(before.0.diff(&snapshot(&client)), Vec::<String>::new());
    assert_eq!(before.1.diff(&snapshot(&lab.nse_ns)), Vec::<String>::new());
}

/// 50 client namespaces, each with nsc-init --watch against one forwarder
/// and one endpoint, all at once: distinct addresses, every one reaches the
/// server through the proxy, and Closing them all leaves nothing.
#[test]
fn fifty_clients_in_parallel() {
    if !nsm_tests::require_root("fifty_clients_in_parallel") {
        return;
    }
    const N: usize = 50;
    let lab = start(ProxyKind::Builtin);
    let nse_before = snapshot(&lab.nse_ns);
    let clients: Vec<Namespace> = (0..N).map(|_| lab.client().unwrap()).collect();
    // Start all, then wait for all: the requests overlap.
    let mut procs: Vec<Process> = clients
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let opts = lab.nsc_options(&format!("par{i}"));
            Process::spawn(
                "nsc-init --watch",
                &mut opts.command(ns, true),
                &lab.dir.join(&format!("nsc-{i}.log")),
            )
            .unwrap()
        })
        .collect();
    let ups: Vec<Up> = procs
        .iter_mut()
        .map(|p| {
            let line = p
                .wait_for_line("an up line", Duration::from_secs(60), |l| {
                    Up::parse(l).is_some()
                })
                .unwrap_or_else(|e| panic!("{e}{}", lab.logs()));
            Up::parse(&line).unwrap()
        })
        .collect();
    let addrs: BTreeSet<IpAddr> = ups
        .iter()
        .map(|u| u.src_ip().expect("an address"))
        .collect();
    assert_eq!(addrs.len(), N, "{N} distinct client addresses: {addrs:?}");
    let nse_up = snapshot(&lab.nse_ns);
    assert_eq!(
        nse_up.links.difference(&nse_before.links).count(),
        N,
        "{N} endpoint-side links"
    );
    for (ns, up) in clients.iter().zip(&ups) {
        assert_through_proxy(&lab, ns, up);
    }
    for p in &mut procs {
        p.signal(nix::sys::signal::Signal::SIGTERM);
    }
    for p in &mut procs {
        let status = p.wait(CLOSE_TIMEOUT).unwrap();
        assert!(status.success(), "{status}: {}", p.tail());
    }
    assert_only_the_idle_table(&lab, &nse_before, &snapshot(&lab.nse_ns));
    for ns in &clients {
        let links = inspect::links(ns).unwrap();
        assert_eq!(links.len(), 1, "only lo left in {}: {links:?}", ns.name());
    }
}

/// Placement sidecar (asked for by the URL's `proxy-placement` label): the
/// client runs its own proxy (uid 1337), the endpoint sends the client no
/// capture routes, and the forwarder installs the endpoint's redirect spec
/// in the client's namespace. The client's own network (a static link, as
/// a pod's eth0) leads to the server; the app's request is captured by the
/// client's proxy, which connects to the server itself (the server sees
/// another connection than the app's, from the client's address), and the
/// endpoint's proxy sees nothing. Close removes the client's rules again.
#[test]
fn sidecar_placement_uses_the_clients_own_proxy() {
    if !nsm_tests::require_root("sidecar_placement_uses_the_clients_own_proxy") {
        return;
    }
    let lab = start(ProxyKind::Builtin);
    let client = lab.client().unwrap();
    lab.attach_static_client(&client).unwrap();
    let sidecar = examples::proxy::start(ProxyKind::Builtin, &client, &lab.dir, "sidecar")
        .unwrap_or_else(|e| panic!("sidecar proxy: {e}"));
    let (client_before, nse_before) = (snapshot(&client), snapshot(&lab.nse_ns));
    let mut opts = lab.nsc_options("sidecar");
    opts.services = "kernel://mesh-proxy/nsm-1?proxy-placement=sidecar".into();
    let (mut nsc, up) = nsc::watch(&client, &opts, &lab.dir.join("nsc.log"), UP_TIMEOUT)
        .unwrap_or_else(|e| panic!("nsc-init --watch: {e}{}", lab.logs()));
    let client_up = snapshot(&client);
    assert!(
        client_up.has_nft_tables(),
        "the forwarder installed the redirect rules in the client: {:?}",
        client_before.diff(&client_up)
    );
    let via = inspect::routes_via(&client, &up.iface).unwrap();
    assert!(
        via.iter().all(|r| !r.starts_with("default")
            && !r.starts_with("0.0.0.0/1")
            && !r.starts_with("128.0.0.0/1")),
        "no capture routes in placement sidecar: {via:?}"
    );

    let ex = http_get(&client, server_addr(), IO_TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "request: {e}{}\n--- sidecar: {}",
            lab.logs(),
            sidecar.tail()
        )
    });
    let deadline = Instant::now() + Duration::from_secs(3);
    let saw = loop {
        match examples::transparent_proxy::find_in_log(&sidecar.log(), ex.local) {
            Some(d) => break d,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => panic!(
                "the client's proxy logged nothing for {}: {}",
                ex.local,
                sidecar.tail()
            ),
        }
    };
    assert_eq!(
        saw,
        server_addr(),
        "the client's proxy connected to the original destination"
    );
    assert_eq!(
        ex.server_saw.ip(),
        STATIC_CLIENT_IP,
        "the server saw the client's own address"
    );
    assert_ne!(
        ex.server_saw, ex.local,
        "the server saw the proxy's connection, not the app's"
    );
    assert_eq!(
        lab.proxy_saw(ex.local),
        None,
        "the endpoint's proxy is not in a sidecar connection's path"
    );

    let status = nsc.terminate(CLOSE_TIMEOUT).unwrap();
    assert!(status.success(), "{status}: {}", nsc.tail());
    assert_eq!(
        client_before.diff(&snapshot(&client)),
        Vec::<String>::new(),
        "Close removed the client's rules and link"
    );
    assert_eq!(
        nse_before.diff(&snapshot(&lab.nse_ns)),
        Vec::<String>::new()
    );
}
