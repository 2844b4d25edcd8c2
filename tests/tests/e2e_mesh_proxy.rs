//! End to end, as the local demo runs it (examples/src/lab.rs): client
//! namespaces running nsc-init against `forwarder-plugin serve`, which
//! plumbs them to `mesh-proxy-nse`, whose namespace holds the mesh proxy
//! (HAProxy or our transparent-proxy, uid 1337) and the link to a server.
//! The tests assert where traffic landed (the proxy's log, the address the
//! server saw), what each namespace holds, and that Close leaves nothing.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use examples::dns;
use examples::inspect::{self, NsState};
use examples::lab::{
    CLIENT_CIDR6, CLUSTER_DNS, CLUSTER_DNS_ANSWER, CLUSTER_DNS6, CLUSTER_HIGH_PORT,
    CLUSTER_SERVICE, CLUSTER_SERVICE_NET, Lab, LabConfig, NODE_IP, NODE_IP6, NSE_UPLINK,
    NSE_UPLINK6, PodNetwork, SERVER_IP6, SERVER_PORT, STATIC_CLIENT_IP, STATIC_CLIENT_LINK,
    server_addr,
};
use examples::namespace::Namespace;
use examples::nsc::{self, NscOptions, Up, exit};
use examples::process::Process;
use examples::proxy::ProxyKind;
use examples::traffic::http_get;
use forwarder_plugin::netns::Netns;
use nsm_tests::topology::{Client, IdentityServer, Reply, any};

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
    let opts = lab.nsc_options("e2e").expect("a client SVID");
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

/// A pod with a network of its own, as a cluster gives it before NSM adds
/// its interface: eth0 on the node's bridge, default routes via the node,
/// the cluster DNS behind a service address, kubelet probes coming from the
/// node, an app listening on 8081.
struct Pod {
    client: Namespace,
    net: PodNetwork,
    /// The app (v4 and v6), in the test process.
    _app: [IdentityServer; 2],
}

const APP_PORT: u16 = 8081;

fn pod(lab: &Lab) -> Pod {
    let client = lab.client().unwrap();
    let net = lab
        .attach_pod_network(&client)
        .unwrap_or_else(|e| panic!("pod network: {e}"));
    let ns = netns(&client);
    let app = [false, true].map(|v6| IdentityServer::tcp(&ns, any(v6, APP_PORT), "pod-app", false));
    Pod {
        client,
        net,
        _app: app,
    }
}

fn netns(ns: &Namespace) -> Netns {
    Netns::open(ns.name()).unwrap_or_else(|e| panic!("{}: {e}", ns.name()))
}

/// A kubelet probe: the node connects to the pod's app, from `src_port`
/// (any when `None`); the app sees the node's address.
fn probe(lab: &Lab, to: IpAddr, src_port: Option<u16>) -> std::io::Result<Reply> {
    let who = Client {
        src_port,
        ..Default::default()
    };
    who.tcp(&netns(&lab.node_ns), SocketAddr::new(to, APP_PORT))
        .map(|(r, _)| r)
}

#[track_caller]
fn assert_probe_answered(lab: &Lab, to: IpAddr, node: IpAddr) {
    let r = probe(lab, to, None)
        .unwrap_or_else(|e| panic!("probe of {to} from the node: {e}{}", lab.logs()));
    assert_eq!(r.label, "pod-app");
    assert_eq!(r.from.ip(), node, "the app saw the node");
}

#[track_caller]
fn assert_dns_answers(pod: &Pod, server: IpAddr, want: Ipv4Addr) {
    let got = dns::resolve(
        &pod.client,
        SocketAddr::new(server, 53),
        "kubernetes.default.svc.cluster.local",
        IO_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got, want, "the answer of {server}");
}

/// A request the pod starts to `to` goes through the endpoint's proxy: the
/// server sees the endpoint's address `via`, and the proxy logged the
/// original destination for the connection — which left the pod from its
/// eth0 address and reached the proxy from its NSM address, same port.
#[track_caller]
fn assert_pod_through_proxy(lab: &Lab, pod: &Pod, up: &Up, to: SocketAddr, via: IpAddr) {
    let ex = http_get(&pod.client, to, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("request to {to}: {e}{}", lab.logs()));
    assert_eq!(
        ex.server_saw.ip(),
        via,
        "the server sees the endpoint{}",
        lab.logs()
    );
    let nsm = up
        .src
        .iter()
        .filter_map(|a| a.split('/').next()?.parse::<IpAddr>().ok())
        .find(|a| a.is_ipv4() == to.is_ipv4())
        .expect("an NSM address of the family");
    let deadline = Instant::now() + Duration::from_secs(3);
    let saw = loop {
        match lab.proxy_saw(SocketAddr::new(nsm, ex.local.port())) {
            Some(d) => break d,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => panic!(
                "the proxy logged nothing for {nsm} port {}{}",
                ex.local.port(),
                lab.logs()
            ),
        }
    };
    assert_eq!(saw, to, "the proxy connected to the original destination");
}

/// Traffic the pod starts to `to` goes its own way: the server sees the
/// pod's eth0 address.
#[track_caller]
fn assert_pod_direct(lab: &Lab, pod: &Pod, to: SocketAddr) {
    let ex = http_get(&pod.client, to, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("request to {to}: {e}{}", lab.logs()));
    assert_eq!(
        ex.server_saw.ip(),
        IpAddr::V4(pod.net.ip),
        "it went via eth0"
    );
    assert_eq!(lab.proxy_saw(ex.local), None, "the proxy saw nothing of it");
}

fn dual_stack_lab(nse_config: Option<&str>) -> Lab {
    let dir = examples::process::WorkDir::create().unwrap();
    let mut config = LabConfig {
        proxy: ProxyKind::Builtin,
        cidr_prefix: format!("[{}], [{CLIENT_CIDR6}]", examples::lab::CLIENT_CIDR),
        ..Default::default()
    };
    if let Some(yaml) = nse_config {
        let path = dir.join("nse-config.yaml");
        std::fs::write(&path, yaml).unwrap();
        config
            .nse_env
            .push(("NSM_CONFIG".into(), path.display().to_string()));
        // The file must outlive the lab.
        std::mem::forget(dir);
    }
    Lab::start(config).unwrap_or_else(|e| panic!("lab: {e}"))
}

/// The default configuration in a pod with a network of its own (issue:
/// the pod's DNS and probes must keep working): TCP the pod starts goes
/// through the proxy (IPv4 and IPv6), UDP DNS to the cluster DNS is
/// answered by the cluster DNS, kubelet probes from the node are answered
/// (also from a low source port), a CIDR the pod excludes goes via eth0,
/// and after Close the pod's routes, rules and firewall are as before.
#[test]
fn in_a_pod_only_what_the_proxy_serves_is_captured() {
    if !nsm_tests::require_root("in_a_pod_only_what_the_proxy_serves_is_captured") {
        return;
    }
    let lab = dual_stack_lab(None);
    let pod = pod(&lab);
    let before = snapshot(&pod.client);
    assert!(
        before
            .routes
            .iter()
            .any(|r| r.starts_with("default via 198.19.200.1 dev eth0")),
        "{before:?}"
    );
    let mut opts = lab.nsc_options("pod").expect("a client SVID");
    opts.services =
        format!("kernel://mesh-proxy/nsm-1?proxy-exclude-outbound-cidrs={CLUSTER_SERVICE_NET}");
    let (mut nsc, up) = nsc::watch(&pod.client, &opts, &lab.dir.join("nsc.log"), UP_TIMEOUT)
        .unwrap_or_else(|e| panic!("nsc-init --watch: {e}{}", lab.logs()));
    assert_eq!(up.src.len(), 2, "dual stack: {up:?}");
    let main = pod.client.exec(&["ip", "-4", "route", "show"]).unwrap();
    assert!(
        main.lines()
            .any(|l| l.trim() == "default via 198.19.200.1 dev eth0"),
        "{main}"
    );
    assert!(
        !main.contains("0.0.0.0/1") && !main.contains("128.0.0.0/1"),
        "no capture by destination: {main}"
    );

    assert_pod_through_proxy(&lab, &pod, &up, server_addr(), IpAddr::V4(NSE_UPLINK));
    assert_pod_through_proxy(
        &lab,
        &pod,
        &up,
        SocketAddr::new(IpAddr::V6(SERVER_IP6), SERVER_PORT),
        IpAddr::V6(NSE_UPLINK6),
    );
    assert_dns_answers(&pod, IpAddr::V4(CLUSTER_DNS), CLUSTER_DNS_ANSWER);
    assert_dns_answers(&pod, IpAddr::V6(CLUSTER_DNS6), CLUSTER_DNS_ANSWER);
    assert_probe_answered(&lab, IpAddr::V4(pod.net.ip), IpAddr::V4(NODE_IP));
    assert_probe_answered(&lab, IpAddr::V6(pod.net.ip6), IpAddr::V6(NODE_IP6));
    let low = probe(&lab, IpAddr::V4(pod.net.ip), Some(1000))
        .unwrap_or_else(|e| panic!("a probe from port 1000: {e}"));
    assert_eq!(
        low.from.port(),
        1000,
        "replies are never captured, whatever their port"
    );
    assert_pod_direct(
        &lab,
        &pod,
        SocketAddr::new(IpAddr::V4(CLUSTER_SERVICE), SERVER_PORT),
    );

    let status = nsc.terminate(CLOSE_TIMEOUT).unwrap();
    assert!(status.success(), "{status}: {}", nsc.tail());
    assert_eq!(
        before.diff(&snapshot(&pod.client)),
        Vec::<String>::new(),
        "Close left the pod's routes, rules and firewall as they were"
    );
    assert_dns_answers(&pod, IpAddr::V4(CLUSTER_DNS), CLUSTER_DNS_ANSWER);
}

/// `capture.dns: true`: the pod's DNS goes to the endpoint's DNS proxy
/// (here a DNS server on 15053 in the endpoint's namespace answering
/// another address) instead of the cluster DNS; TCP and probes as before.
#[test]
fn dns_capture_sends_the_pods_dns_to_the_endpoint() {
    if !nsm_tests::require_root("dns_capture_sends_the_pods_dns_to_the_endpoint") {
        return;
    }
    let lab = dual_stack_lab(Some("version: 1\ncapture: {dns: true}\n"));
    let proxied: Ipv4Addr = "198.19.55.55".parse().unwrap();
    let mut cmd = lab.nse_ns.command(examples::process::bin("hello-server"));
    // One dual-stack socket: IPv4 queries arrive on it too.
    cmd.args(["--listen", "127.0.0.1:18080", "--dns", "[::]:15053"])
        .args(["--dns-answer", &proxied.to_string()]);
    let mut dns_proxy =
        Process::spawn("dns proxy", &mut cmd, &lab.dir.join("dns-proxy.log")).unwrap();
    examples::proxy::wait_listening(&mut dns_proxy, 18080, IO_TIMEOUT).unwrap();
    let pod = pod(&lab);
    let before = snapshot(&pod.client);
    let (mut nsc, up) = nsc::watch(
        &pod.client,
        &lab.nsc_options("dns").expect("a client SVID"),
        &lab.dir.join("nsc.log"),
        UP_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("nsc-init --watch: {e}{}", lab.logs()));
    assert_dns_answers(&pod, IpAddr::V4(CLUSTER_DNS), proxied);
    assert_dns_answers(&pod, IpAddr::V6(CLUSTER_DNS6), proxied);
    assert_pod_through_proxy(&lab, &pod, &up, server_addr(), IpAddr::V4(NSE_UPLINK));
    assert_probe_answered(&lab, IpAddr::V4(pod.net.ip), IpAddr::V4(NODE_IP));
    let status = nsc.terminate(CLOSE_TIMEOUT).unwrap();
    assert!(status.success(), "{status}: {}", nsc.tail());
    assert_eq!(before.diff(&snapshot(&pod.client)), Vec::<String>::new());
    assert_dns_answers(&pod, IpAddr::V4(CLUSTER_DNS), CLUSTER_DNS_ANSWER);
}

/// Capture method `policies`, what NSM's own forwarders can install (our
/// forwarder installs NSM's policy routes the same way, and no rules of
/// its own): outbound TCP goes through the proxy, DNS and probes keep
/// working, and the documented limits hold — TCP to a port outside
/// `capture.ports` (default 1-32767) is not captured, and a reply to a
/// peer that connected from inside that range is (a rule cannot tell a
/// reply from a request), so that peer gets no answer.
#[test]
fn nsm_policy_routes_capture_by_port_with_the_documented_limits() {
    if !nsm_tests::require_root("nsm_policy_routes_capture_by_port_with_the_documented_limits") {
        return;
    }
    let lab = dual_stack_lab(Some("version: 1\ncapture: {method: policies}\n"));
    let pod = pod(&lab);
    let before = snapshot(&pod.client);
    let (mut nsc, up) = nsc::watch(
        &pod.client,
        &lab.nsc_options("pol").expect("a client SVID"),
        &lab.dir.join("nsc.log"),
        UP_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("nsc-init --watch: {e}{}", lab.logs()));
    let rules = pod.client.exec(&["ip", "-4", "rule"]).unwrap();
    assert!(
        rules.contains("ipproto tcp dport 1-32767 lookup"),
        "{rules}"
    );
    assert!(
        !snapshot(&pod.client).has_nft_tables(),
        "no rules of ours in the pod"
    );

    assert_pod_through_proxy(&lab, &pod, &up, server_addr(), IpAddr::V4(NSE_UPLINK));
    assert_dns_answers(&pod, IpAddr::V4(CLUSTER_DNS), CLUSTER_DNS_ANSWER);
    assert_probe_answered(&lab, IpAddr::V4(pod.net.ip), IpAddr::V4(NODE_IP));
    // Limit 1: outside the captured ports, TCP goes the pod's own way.
    assert_pod_direct(
        &lab,
        &pod,
        SocketAddr::new(IpAddr::V4(CLUSTER_SERVICE), CLUSTER_HIGH_PORT),
    );
    // Limit 2: a peer connecting from port 1000 gets its reply routed to
    // the endpoint, which refuses it.
    let e = probe(&lab, IpAddr::V4(pod.net.ip), Some(1000)).unwrap_err();
    // connect() bounded by SO_SNDTIMEO ends with EINPROGRESS.
    assert!(
        e.kind() == std::io::ErrorKind::TimedOut
            || e.raw_os_error() == Some(nix::libc::EINPROGRESS),
        "{e}"
    );

    let status = nsc.terminate(CLOSE_TIMEOUT).unwrap();
    assert!(status.success(), "{status}: {}", nsc.tail());
    assert_eq!(before.diff(&snapshot(&pod.client)), Vec::<String>::new());
    assert_probe_answered(&lab, IpAddr::V4(pod.net.ip), IpAddr::V4(NODE_IP));
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
    let mut opts = lab.nsc_options("refresh").expect("a client SVID");
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
    let run = nsc::run(&client, &lab.nsc_options("once").expect("a client SVID")).unwrap();
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
    let opts = lab.nsc_options("again").expect("a client SVID");
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
    let mut opts = lab.nsc_options("unknown").expect("a client SVID");
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
            let opts = lab.nsc_options(&format!("par{i}")).expect("a client SVID");
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
    let mut opts = lab.nsc_options("sidecar").expect("a client SVID");
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
