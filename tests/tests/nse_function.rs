//! The mesh-proxy network function of a real `mesh-proxy-nse`, running in a
//! namespace of its own and asked for connections the way a forwarder asks:
//! the rules it installs there, the capture (NSM policy routes, or our
//! capture spec when the forwarder announces it applies one) and client
//! spec it returns, and where a client's traffic lands once the connection
//! is plumbed as the forwarder plumbs it (`forwarder_plugin::hop`'s
//! dataplane: the veth, the client's routing and rules).

mod nse_support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use forwarder_plugin::hop::{
    BackendName, Ends, HopRecord, Session, announce_features, client_capture, dataplane, owner_for,
    policies, veth_plan,
};
use forwarder_plugin::link::Links;
use forwarder_plugin::netns::Netns;
use forwarder_plugin::rules::{CaptureSpec, Plan, RedirectSpec};
use nse_support::*;
use nsm_api::connection::Connection;
use nsm_api::mechanism::MechanismExt;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_tests::netns::TestNetns;
use nsm_tests::topology::{Client, IdentityServer, Reply, any, v4};
use tonic::Code;

const KEY: &str = "mesh-proxy.v1/client-redirect";
const TABLE: &str = "mesh_proxy_nse";

fn root(test: &str) -> bool {
    nsm_tests::require_root(test)
}

/// A config file for the NSE, kept as long as the value lives.
struct ConfigFile(TempDir);

impl ConfigFile {
    fn new(yaml: &str) -> Self {
        let dir = TempDir::new();
        std::fs::write(dir.path().join("config.yaml"), yaml).unwrap();
        ConfigFile(dir)
    }

    fn path(&self) -> String {
        self.0.path().join("config.yaml").display().to_string()
    }
}

fn nse_netns(nse: &Nse) -> &TestNetns {
    nse.netns.as_ref().expect("as root the NSE has a namespace")
}

/// Our table in the NSE's namespace, as `nft list table` prints it.
fn table(ns: &TestNetns) -> Option<String> {
    let out = ns.exec(&["nft", "list", "table", "inet", TABLE]);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The interfaces our table captures: the members of its interface set,
/// sorted; `None` when there is no table. (The table stays when the last
/// connection goes, with an empty set: see nse/README.md.)
fn captured(ns: &TestNetns) -> Option<Vec<String>> {
    let out = ns.exec(&["nft", "-j", "list", "set", "inet", TABLE, "include_ifaces"]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft json");
    let set = v["nftables"]
        .as_array()
        .and_then(|a| a.iter().find_map(|o| o.get("set")))
        .expect("a set in the listing")
        .clone();
    let mut members: Vec<String> = set["elem"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e.as_str().expect("an interface name").to_owned())
                .collect()
        })
        .unwrap_or_default();
    members.sort();
    Some(members)
}

fn interface(conn: &Connection) -> String {
    conn.mechanism
        .as_ref()
        .and_then(|m| m.interface_name())
        .expect("the returned KERNEL name")
        .to_owned()
}

/// `(prefix, nextHop)` of the client's routes that go via the endpoint
/// (none: the client keeps its own routes, plus IPAM's point-to-point one).
fn via_routes(conn: &Connection) -> Vec<(String, String)> {
    ip(conn)
        .src_routes
        .iter()
        .filter(|r| !r.next_hop.is_empty())
        .map(|r| (r.prefix.clone(), r.next_hop.clone()))
        .collect()
}

fn client_spec(conn: &Connection) -> Option<&String> {
    conn.context.as_ref()?.extra_context.get(KEY)
}

fn capture_spec(conn: &Connection) -> Option<CaptureSpec> {
    client_capture(conn).expect("a valid capture spec, if any")
}

/// A Request from `forwarder-plugin serve`, which announces the
/// client-side work it does (placement sidecar, capture method rules).
fn req_ours() -> NetworkServiceRequest {
    let mut r = req_p();
    announce_features(conn_mut(&mut r));
    r
}

/// Its refresh: the returned connection, announced again.
fn refresh_ours(conn: &Connection) -> NetworkServiceRequest {
    let mut r = refresh_of(conn);
    announce_features(conn_mut(&mut r));
    r
}

fn with_labels(mut req: NetworkServiceRequest, labels: &[(&str, &str)]) -> NetworkServiceRequest {
    for (k, v) in labels {
        conn_mut(&mut req)
            .labels
            .insert((*k).to_owned(), (*v).to_owned());
    }
    req
}

/// A client namespace joined to the NSE's by the veth the forwarder would
/// build from `conn` (client end `src_*`, endpoint end `dst_*`).
struct PlumbedClient {
    ns: TestNetns,
    netns: Netns,
}

impl PlumbedClient {
    /// Plumbs `conn` as the hop does: veth, the client's routing (capture
    /// or policy routes) and rules.
    async fn plumb(nse: &Nse, conn: &Connection) -> PlumbedClient {
        let ns = TestNetns::new("cli");
        let netns = Netns::open(ns.name()).unwrap();
        let endpoint = Netns::open(nse_netns(nse).name()).unwrap();
        let client_if = nsm_tests::unique("nc");
        let endpoint_if = interface(conn);
        let plan = veth_plan(
            Ends {
                client_netns: netns.id(),
                endpoint_netns: endpoint.id(),
                client_if: &client_if,
                endpoint_if: &endpoint_if,
            },
            conn,
        )
        .expect("a veth plan from the returned connection");
        let record = HopRecord {
            proxy: None,
            proxy_alt: false,
            labels: Default::default(),
            plan,
            rules: None,
            capture: capture_spec(conn),
            policies: policies(conn).expect("valid policy routes"),
            slot: Some(1),
            backend: BackendName::Nft,
            owner: owner_for(&conn.id).as_str().to_owned(),
            client_netns: netns.id().to_string(),
            endpoint_netns: endpoint.id().to_string(),
            client_cookie: None,
            endpoint_cookie: None,
            session: Session::default(),
        };
        let (a, b) = (
            Links::open(&netns).unwrap(),
            Links::open(&endpoint).unwrap(),
        );
        dataplane::apply(&record, &a, &b, true)
            .await
            .expect("plumb the connection");
        PlumbedClient { ns, netns }
    }

    fn tcp(&self, to: SocketAddr) -> std::io::Result<Reply> {
        Client::default().tcp(&self.netns, to).map(|(r, _)| r)
    }

    fn reaches(&self, to: SocketAddr) -> Reply {
        self.tcp(to)
            .unwrap_or_else(|e| panic!("client → {to}: {e}"))
    }
}

/// Identity servers on the proxy port of the NSE's namespace, v4 and v6.
fn proxy(nse: &Nse, port: u16, transparent: bool) -> [IdentityServer; 2] {
    let ns = Netns::open(nse_netns(nse).name()).unwrap();
    [false, true].map(|v6| IdentityServer::tcp(&ns, any(v6, port), "proxy", transparent))
}

fn addr(s: &str, port: u16) -> SocketAddr {
    SocketAddr::new(s.parse::<IpAddr>().unwrap(), port)
}

#[tokio::test]
async fn proxy_placement_sends_the_connections_traffic_to_the_proxy() {
    if !root("proxy_placement_sends_the_connections_traffic_to_the_proxy") {
        return;
    }
    // No config file: placement proxy, port 15001, REDIRECT, capture all.
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "[198.18.10.0/31], [fd00:10::/127]")]).await;
    let ns = nse_netns(&nse);
    let (conn, _) = nse.request(req_ours()).await.expect("Request");
    let nic = interface(&conn);

    // Behind our forwarder: a capture spec for the client's side (TCP it
    // starts, everywhere), no route via the endpoint, no policy routes.
    let spec = capture_spec(&conn).expect("the client's capture spec");
    assert_eq!(spec, CaptureSpec::default());
    assert_eq!(via_routes(&conn), Vec::<(String, String)>::new());
    assert!(ip(&conn).policies.is_empty());
    assert_eq!(
        p2p_routes(&ip(&conn).src_routes),
        ["198.18.10.0/32", "fd00:10::/128"]
    );
    assert!(
        client_spec(&conn).is_none(),
        "no client-side redirect rules"
    );
    assert!(
        !conn
            .context
            .as_ref()
            .unwrap()
            .extra_context
            .contains_key("mesh-proxy.v1/forwarder-features"),
        "the forwarder's announcement is not echoed"
    );
    // One table, capturing what arrives on the connection's interface, and
    // nothing at the output hook (the proxy's upstream leaves directly).
    let t = table(ns).expect("our table in the NSE's namespace");
    assert_eq!(captured(ns), Some(vec![nic.clone()]), "{t}");
    assert!(t.contains("iifname @include_ifaces"), "{t}");
    assert!(t.contains("redirect to :15001"), "{t}");
    assert!(!t.contains("hook output"), "{t}");

    let _proxy = proxy(&nse, 15001, false);
    let client = PlumbedClient::plumb(&nse, &conn).await;
    for dst in [
        addr("198.19.5.5", 80),
        addr("198.18.10.0", 8080),
        addr("fd00:99::5", 443),
    ] {
        let r = client.reaches(dst);
        assert_eq!((r.label.as_str(), r.orig), ("proxy", Some(dst)), "{dst}");
        assert_eq!(r.local.port(), 15001);
    }
    // The proxy sees the client's own address.
    let from: IpAddr = "198.18.10.1".parse().unwrap();
    assert_eq!(client.reaches(addr("198.19.5.5", 80)).from.ip(), from);
    // What reaches the endpoint for another host and is not TCP is refused
    // (ICMP administratively prohibited), not dropped silently; here UDP,
    // which the client only sends that way for want of any other route.
    let e = Client::default()
        .udp(&client.netns, addr("198.19.5.5", 5353))
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::HostUnreachable, "{e}");
    let t = table(ns).unwrap();
    assert!(t.contains("reject with icmpx admin-prohibited"), "{t}");

    // The proxy's own connections to the client are not captured, whoever makes them.
    let app = IdentityServer::tcp(&client.netns, any(false, 9000), "client-app", false);
    let nse_ns = Netns::open(ns.name()).unwrap();
    for who in [Client::default(), Client::uid(1337)] {
        let (r, _) = who
            .tcp(&nse_ns, v4("198.18.10.1".parse().unwrap(), 9000))
            .unwrap();
        assert_eq!(r.label, "client-app", "{who:?}");
    }
    drop(app);

    // A refresh changes nothing.
    let (again, _) = nse.request(refresh_ours(&conn)).await.expect("refresh");
    assert_eq!(ip(&again), ip(&conn));
    assert_eq!(capture_spec(&again), Some(spec));
    assert_eq!(table(ns).as_deref(), Some(t.as_str()), "same rules");

    // Close: the interface leaves the set (the table stays, capturing
    // nothing), and the endpoint's address is just an address again.
    nse.close(again).await.expect("Close");
    assert_eq!(
        captured(ns),
        Some(vec![]),
        "interface left after the last Close"
    );
    let e = client.tcp(addr("198.18.10.0", 8080)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    drop(client.ns);

    // A clean exit with no connection left removes the table too.
    let mut nse = nse;
    let status = nse.child.terminate(WAIT).expect("the NSE exits on SIGTERM");
    assert!(status.success(), "{status}: {}", nse.log());
    let ruleset = nse_netns(&nse).exec_ok(&["nft", "list", "ruleset"]);
    assert!(!ruleset.contains(TABLE), "{ruleset}");
}

/// Behind a forwarder that announces nothing (NSM's own), the client's
/// capture is NSM policy routes: TCP to ports 1-32767 (below Linux's
/// ephemeral range) looks up a table of its own holding the capture CIDRs
/// via the endpoint. What a rule cannot tell apart is documented: TCP to
/// ports outside that range is not captured.
#[tokio::test]
async fn behind_nsm_forwarders_capture_is_policy_routes() {
    if !root("behind_nsm_forwarders_capture_is_policy_routes") {
        return;
    }
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "198.18.20.0/31")]).await;
    let (conn, _) = nse.request(req_p()).await.expect("Request");
    assert!(
        capture_spec(&conn).is_none(),
        "no key a stock forwarder ignores"
    );
    assert!(via_routes(&conn).is_empty(), "the client keeps its routes");
    let p = &ip(&conn).policies;
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        (p[0].proto.as_str(), p[0].dst_port.as_str()),
        ("6", "1-32767")
    );
    let routes: Vec<(&str, &str)> = p[0]
        .routes
        .iter()
        .map(|r| (r.prefix.as_str(), r.next_hop.as_str()))
        .collect();
    assert_eq!(routes, [("0.0.0.0/0", "198.18.20.0")]);

    let _proxy = proxy(&nse, 15001, false);
    let client = PlumbedClient::plumb(&nse, &conn).await;
    let dst = addr("198.19.5.5", 80);
    assert_eq!(client.reaches(dst).orig, Some(dst));
    let rules = client.ns.exec_ok(&["ip", "-4", "rule"]);
    assert!(
        rules.contains("ipproto tcp dport 1-32767 lookup"),
        "{rules}"
    );
    let e = client.tcp(addr("198.19.5.5", 40000)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NetworkUnreachable, "{e}");
    nse.close(conn).await.unwrap();
}

/// What lands in the endpoint's namespace is the endpoint's to decide: a
/// client's `dst_routes` (both halves of everything, via its own address:
/// every other client's proxied traffic would follow) and extra
/// `dst_ip_addrs` are not in the reply, so no forwarder installs them.
#[tokio::test]
async fn a_clients_dst_routes_never_reach_the_endpoints_namespace() {
    if !root("a_clients_dst_routes_never_reach_the_endpoints_namespace") {
        return;
    }
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "198.18.21.0/31")]).await;
    let mut req = req_ours();
    let ctx = conn_mut(&mut req).context.get_or_insert_default();
    ctx.ip_context = Some(nsm_api::connectioncontext::IpContext {
        dst_ip_addrs: vec!["198.19.66.1/32".into()],
        dst_routes: ["0.0.0.0/1", "128.0.0.0/1"]
            .map(|p| nsm_api::connectioncontext::Route {
                prefix: p.into(),
                next_hop: "198.18.21.1".into(),
            })
            .to_vec(),
        ..Default::default()
    });
    let (conn, _) = nse.request(req).await.expect("Request");
    assert_eq!(ip(&conn).dst_ip_addrs, ["198.18.21.0/32"]);
    let dst: Vec<(&str, &str)> = ip(&conn)
        .dst_routes
        .iter()
        .map(|r| (r.prefix.as_str(), r.next_hop.as_str()))
        .collect();
    assert_eq!(dst, [("198.18.21.1/32", "")]);
    let _client = PlumbedClient::plumb(&nse, &conn).await;
    let routes = nse_netns(&nse).exec_ok(&["ip", "-4", "route", "show", "table", "all"]);
    assert!(
        !routes.contains("0.0.0.0/1") && !routes.contains("128.0.0.0/1"),
        "{routes}"
    );
    let addrs = nse_netns(&nse).exec_ok(&["ip", "-4", "addr"]);
    assert!(!addrs.contains("198.19.66.1"), "{addrs}");
    nse.close(conn).await.unwrap();
}

#[tokio::test]
async fn connections_share_one_table_and_leave_it_one_by_one() {
    if !root("connections_share_one_table_and_leave_it_one_by_one") {
        return;
    }
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "198.18.11.0/30")]).await;
    let ns = nse_netns(&nse);
    let (a, _) = nse.request(req_p()).await.unwrap();
    let (b, _) = nse.request(req_p()).await.unwrap();
    let (nic_a, nic_b) = (interface(&a), interface(&b));
    let mut both = vec![nic_a.clone(), nic_b.clone()];
    both.sort();
    assert_eq!(captured(ns), Some(both));
    let _proxy = proxy(&nse, 15001, false);
    let (ca, cb) = (
        PlumbedClient::plumb(&nse, &a).await,
        PlumbedClient::plumb(&nse, &b).await,
    );
    let far = addr("198.19.7.7", 80);
    assert_eq!(ca.reaches(far).label, "proxy");
    assert_eq!(cb.reaches(far).label, "proxy");

    nse.close(a.clone()).await.unwrap();
    assert_eq!(
        captured(ns),
        Some(vec![nic_b.clone()]),
        "b is still captured"
    );
    assert_eq!(cb.reaches(far).orig, Some(far));
    let a_endpoint = addr(ip(&a).dst_ip_addrs[0].split('/').next().unwrap(), 8080);
    assert_eq!(
        ca.tcp(a_endpoint).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    // Closing again is quiet and changes nothing.
    nse.close(a).await.expect("second Close");
    assert_eq!(captured(ns), Some(vec![nic_b.clone()]));

    nse.close(b.clone()).await.unwrap();
    assert_eq!(captured(ns), Some(vec![]));
    let b_endpoint = addr(ip(&b).dst_ip_addrs[0].split('/').next().unwrap(), 8080);
    assert_eq!(
        cb.tcp(b_endpoint).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused,
        "b's traffic is no longer captured"
    );
}

/// 200 connections in placement proxy, Requested in parallel as many
/// forwarders would: every one's traffic reaches the proxy; closing every
/// other one (in parallel too) stops capturing exactly those, and the rest
/// still land on the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_connections_capture_and_half_of_them_leave() {
    if !root("two_hundred_connections_capture_and_half_of_them_leave") {
        return;
    }
    const N: usize = 200;
    let nse = Arc::new(Nse::start(&[("NSM_CIDR_PREFIX", "198.18.32.0/23")]).await);
    let ns = nse_netns(&nse);
    let requests: Vec<_> = (0..N)
        .map(|_| {
            let nse = nse.clone();
            tokio::spawn(async move { nse.request(req_p()).await.map(|(c, _)| c) })
        })
        .collect();
    let mut conns = Vec::new();
    for r in requests {
        conns.push(r.await.unwrap().expect("every parallel Request succeeds"));
    }
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let nics = sorted(conns.iter().map(interface).collect());
    assert_eq!(captured(ns).as_ref(), Some(&nics), "all {N} captured");

    let _proxy = proxy(&nse, 15001, false);
    let mut clients = Vec::new();
    for c in &conns {
        clients.push(PlumbedClient::plumb(&nse, c).await);
    }
    let far = addr("198.19.7.7", 80);
    for (c, client) in conns.iter().zip(&clients) {
        let r = client.reaches(far);
        assert_eq!(
            (r.label.as_str(), r.orig),
            ("proxy", Some(far)),
            "{}",
            interface(c)
        );
    }

    let (gone, kept): (Vec<_>, Vec<_>) = conns
        .iter()
        .cloned()
        .zip(&clients)
        .enumerate()
        .partition(|(i, _)| i % 2 == 0);
    let closes: Vec<_> = gone
        .iter()
        .map(|(_, (c, _))| {
            let (nse, c) = (nse.clone(), c.clone());
            tokio::spawn(async move { nse.close(c).await.map(drop) })
        })
        .collect();
    for c in closes {
        c.await.unwrap().expect("every parallel Close succeeds");
    }
    let kept_nics = sorted(kept.iter().map(|(_, (c, _))| interface(c)).collect());
    assert_eq!(captured(ns), Some(kept_nics), "the other half captured");
    for (_, (c, client)) in &kept {
        let r = client.reaches(far);
        assert_eq!(
            (r.label.as_str(), r.orig),
            ("proxy", Some(far)),
            "{}",
            interface(c)
        );
    }
    for (_, (c, client)) in &gone {
        let endpoint = addr(ip(c).dst_ip_addrs[0].split('/').next().unwrap(), 8080);
        assert_eq!(
            client.tcp(endpoint).unwrap_err().kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{} is no longer captured",
            interface(c)
        );
    }
}

#[tokio::test]
async fn tproxy_mode_hands_over_the_original_addresses() {
    if !root("tproxy_mode_hands_over_the_original_addresses") {
        return;
    }
    let config = ConfigFile::new("version: 1\nproxy: {mode: tproxy, port: 15101}\n");
    let nse = Nse::start(&[
        ("NSM_CIDR_PREFIX", "198.18.12.0/31"),
        ("NSM_CONFIG", &config.path()),
    ])
    .await;
    let ns = nse_netns(&nse);
    let (conn, _) = nse.request(req_p()).await.unwrap();
    let _proxy = proxy(&nse, 15101, true);
    let client = PlumbedClient::plumb(&nse, &conn).await;
    let dst = addr("198.19.8.8", 80);
    let r = client.reaches(dst);
    // No NAT: the transparent socket is the original destination.
    assert_eq!((r.label.as_str(), r.local), ("proxy", dst));
    assert_eq!(r.from.ip(), "198.18.12.1".parse::<IpAddr>().unwrap());
    let rules = ns.exec_ok(&["ip", "-4", "rule"]);
    assert!(rules.contains("lookup 133"), "{rules}");

    nse.close(conn).await.unwrap();
    assert_eq!(captured(ns), Some(vec![]));
    let e = client.tcp(addr("198.18.12.0", 8080)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    // The policy route goes with the table, at a clean exit.
    let mut nse = nse;
    assert!(nse.child.terminate(WAIT).is_some_and(|s| s.success()));
    let ns = nse_netns(&nse);
    assert_eq!(table(ns), None);
    let rules = ns.exec_ok(&["ip", "-4", "rule"]);
    assert!(!rules.contains("lookup 133"), "policy route left: {rules}");
}

#[tokio::test]
async fn the_iptables_backend_does_the_same() {
    if !root("the_iptables_backend_does_the_same") {
        return;
    }
    let config = ConfigFile::new("version: 1\nrules: {backend: iptables}\n");
    let nse = Nse::start(&[
        ("NSM_CIDR_PREFIX", "198.18.17.0/31"),
        ("NSM_CONFIG", &config.path()),
    ])
    .await;
    let ns = nse_netns(&nse);
    let (conn, _) = nse.request(req_p()).await.unwrap();
    let saved = ns.exec_ok(&["iptables-save"]);
    assert!(
        saved.contains(&format!("-i {} -p tcp", interface(&conn))),
        "{saved}"
    );
    assert!(saved.contains("MESH_PROXY_NSE_IN_REDIRECT"), "{saved}");
    assert!(
        !saved.contains("-A OUTPUT"),
        "nothing at the output hook: {saved}"
    );
    let _proxy = proxy(&nse, 15001, false);
    let client = PlumbedClient::plumb(&nse, &conn).await;
    let dst = addr("198.19.9.9", 80);
    assert_eq!(client.reaches(dst).orig, Some(dst));

    nse.close(conn.clone()).await.unwrap();
    let saved = ns.exec_ok(&["iptables-save"]);
    assert!(
        !saved.contains(&format!("-i {}", interface(&conn))),
        "{saved}"
    );
    let e = client.tcp(addr("198.18.17.0", 8080)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let mut nse = nse;
    assert!(nse.child.terminate(WAIT).is_some_and(|s| s.success()));
    let saved = nse_netns(&nse).exec_ok(&["iptables-save"]);
    assert!(!saved.contains("MESH_PROXY"), "{saved}");
}

#[tokio::test]
async fn sidecar_placement_returns_the_clients_spec_and_installs_nothing() {
    if !root("sidecar_placement_returns_the_clients_spec_and_installs_nothing") {
        return;
    }
    let config = ConfigFile::new(
        "version: 1\nplacement: sidecar\nsidecar: {excludeOutboundPorts: [15020], captureDns: true}\n",
    );
    let nse = Nse::start(&[
        ("NSM_CIDR_PREFIX", "198.18.13.0/30"),
        ("NSM_CONFIG", &config.path()),
    ])
    .await;
    let ns = nse_netns(&nse);
    // Behind a forwarder that cannot apply it: refused, nothing held.
    let e = nse.request(req_p()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("use placement proxy"),
        "{}",
        e.message()
    );

    let req = with_labels(req_ours(), &[("proxy-exclude-outbound-ports", "22;2222")]);
    let (conn, _) = nse.request(req).await.unwrap();
    let text = client_spec(&conn).expect("the client's redirect spec");
    let spec = RedirectSpec::from_json(text).expect("a valid version-1 spec");
    Plan::new(&spec).expect("a plan the forwarder can apply");
    assert!(spec.capture_dns);
    let ports: Vec<u16> = spec.exclude_outbound_ports.iter().map(|p| p.0).collect();
    assert_eq!(ports, [15020, 22, 2222]);
    assert!(via_routes(&conn).is_empty(), "the client keeps its routes");
    assert!(capture_spec(&conn).is_none() && ip(&conn).policies.is_empty());
    assert_eq!(p2p_routes(&ip(&conn).src_routes), ["198.18.13.0/32"]);
    assert_eq!(table(ns), None);
    assert_eq!(ns.exec_ok(&["nft", "list", "ruleset"]).trim(), "");

    // A connection may ask for the other placement, and switch back on refresh.
    let (proxied, _) = nse
        .request(with_labels(req_ours(), &[("proxy-placement", "proxy")]))
        .await
        .unwrap();
    assert!(client_spec(&proxied).is_none());
    assert!(
        capture_spec(&proxied).is_some(),
        "captured by the forwarder's rules"
    );
    assert_eq!(captured(ns), Some(vec![interface(&proxied)]));
    let mut refresh = refresh_ours(&proxied);
    conn_mut(&mut refresh)
        .labels
        .insert("proxy-placement".into(), "sidecar".into());
    let (switched, _) = nse.request(refresh).await.unwrap();
    assert!(client_spec(&switched).is_some());
    assert!(
        capture_spec(&switched).is_none(),
        "the other placement's key went"
    );
    assert_eq!(
        captured(ns),
        Some(vec![]),
        "its capture went with the switch"
    );
}

#[tokio::test]
async fn bad_labels_and_unknown_services_are_refused_and_hold_nothing() {
    if !root("bad_labels_and_unknown_services_are_refused_and_hold_nothing") {
        return;
    }
    // One address pair: anything a refused Request kept would starve the last one.
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "198.18.14.0/31")]).await;
    let ns = nse_netns(&nse);
    for (labels, want) in [
        (
            vec![("proxy-exclude-outbound-cidrs", "198.19.0.0/16,banana")],
            "label \"proxy-exclude-outbound-cidrs\": \"banana\" is not a CIDR",
        ),
        (
            vec![("proxy-exclude-outbound-ports", "22")],
            "label \"proxy-exclude-outbound-ports\" applies to placement sidecar only",
        ),
        (
            vec![("proxy-placement", "inline")],
            "label \"proxy-placement\"",
        ),
        (vec![("proxy-bypass", "yes")], "unknown proxy-* label"),
    ] {
        let e = nse
            .request(with_labels(req_p(), &labels))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{labels:?}: {e:?}");
        assert!(e.message().contains(want), "{labels:?}: {}", e.message());
        assert_eq!(table(ns), None, "{labels:?}: rules were installed");
    }
    let mut req = req_p();
    conn_mut(&mut req).network_service = "icmp-responder".into();
    let e = nse.request(req).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(
        e.message(),
        "network service \"icmp-responder\" is not served by this endpoint (serves: mesh-proxy)"
    );
    // Labels that are not ours are ignored; the pair is still free.
    let (conn, _) = nse
        .request(with_labels(
            req_p(),
            &[("podName", "web-1"), ("proxy", "x")],
        ))
        .await
        .expect("nothing was held by the refused Requests");
    assert_eq!(ip(&conn).dst_ip_addrs, ["198.18.14.0/32"]);
    assert_eq!(captured(ns), Some(vec![interface(&conn)]));
}

#[tokio::test]
async fn rules_the_kernel_refuses_fail_the_request_and_roll_everything_back() {
    if !root("rules_the_kernel_refuses_fail_the_request_and_roll_everything_back") {
        return;
    }
    // TPROXY with IPv6 disabled in the NSE's namespace: the IPv6 local route
    // a dual-stack connection needs cannot be added there.
    let ns = TestNetns::new("nse");
    for dev in ["all", "default", "lo"] {
        ns.exec_ok(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{dev}.disable_ipv6=1"),
        ]);
    }
    let config = ConfigFile::new("version: 1\nproxy: {mode: tproxy}\n");
    // One CIDR group of two prefixes: a connection gets its pair from the
    // first that has one, or the free pair of either it presents.
    let nse = Nse::start_with(
        &[
            ("NSM_CIDR_PREFIX", "[198.18.19.0/30, fd00:19::/126]"),
            ("NSM_CONFIG", &config.path()),
        ],
        StartOptions {
            netns: Some(ns),
            ..Default::default()
        },
    )
    .await;
    let ns = nse_netns(&nse);
    let (first, _) = nse.request(req_p()).await.expect("an IPv4 connection");
    let before = table(ns).expect("the first connection's rules");
    let rules_before = ns.exec_ok(&["ip", "-4", "rule"]);

    // A client presenting IPv6 addresses of the endpoint's own pool, which
    // IPAM gives it back (as after a heal): a connection with IPv6.
    let mut req = req_p();
    conn_mut(&mut req).context = Some(nsm_api::connectioncontext::ConnectionContext {
        ip_context: Some(nsm_api::connectioncontext::IpContext {
            src_ip_addrs: vec!["fd00:19::1/128".into()],
            dst_ip_addrs: vec!["fd00:19::/128".into()],
            ..Default::default()
        }),
        ..Default::default()
    });
    let e = nse.request(req).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(
        e.message()
            .starts_with("network function mesh-proxy failed: inet mesh_proxy_nse"),
        "{}",
        e.message()
    );
    assert!(e.message().contains("rolled back"), "{}", e.message());
    // The first connection's rules are as they were, and the refused one
    // holds no addresses: the last pair is still free.
    assert_eq!(table(ns).as_deref(), Some(before.as_str()));
    assert_eq!(ns.exec_ok(&["ip", "-4", "rule"]), rules_before);
    let (second, _) = nse.request(req_p()).await.expect("the pair was given back");
    assert_eq!(ip(&second).dst_ip_addrs, ["198.18.19.2/32"]);
    let mut both = vec![interface(&first), interface(&second)];
    both.sort();
    assert_eq!(captured(ns), Some(both));
    nse.close(first).await.unwrap();
    nse.close(second).await.unwrap();
    assert_eq!(captured(ns), Some(vec![]));
}

#[tokio::test]
async fn a_restarted_nse_starts_without_the_old_rules_and_refresh_restores_them() {
    if !root("a_restarted_nse_starts_without_the_old_rules_and_refresh_restores_them") {
        return;
    }
    let env = [("NSM_CIDR_PREFIX", "198.18.15.0/31")];
    let nse = Nse::start(&env).await;
    let (conn, _) = nse.request(req_p()).await.unwrap();
    assert!(table(nse_netns(&nse)).is_some());
    // SIGKILL: nothing runs on the way out, so the table stays behind.
    let ns = nse.kill().unwrap();
    assert!(table(&ns).is_some());

    let nse = Nse::start_with(
        &env,
        StartOptions {
            netns: Some(ns),
            ..Default::default()
        },
    )
    .await;
    let ns = nse_netns(&nse);
    assert_eq!(table(ns), None, "cleaned up at start");
    // The forwarder's next refresh brings the connection, and its rules, back.
    let (again, _) = nse.request(refresh_of(&conn)).await.expect("refresh");
    assert_eq!(ip(&again).dst_ip_addrs, ip(&conn).dst_ip_addrs);
    assert_eq!(captured(ns), Some(vec![interface(&conn)]));
}

/// `setpriv` as an unprivileged user, with or without CAP_NET_ADMIN.
fn unprivileged(net_admin: bool) -> Vec<String> {
    let mut v: Vec<String> = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ]
    .map(String::from)
    .to_vec();
    if net_admin {
        v.extend(["--inh-caps=+net_admin", "--ambient-caps=+net_admin"].map(String::from));
    }
    v
}

#[tokio::test]
async fn cap_net_admin_is_needed_for_placement_proxy_and_enough() {
    if !root("cap_net_admin_is_needed_for_placement_proxy_and_enough")
        || !nsm_tests::require_tool(
            "cap_net_admin_is_needed_for_placement_proxy_and_enough",
            "setpriv",
        )
    {
        return;
    }
    let env = [("NSM_CIDR_PREFIX", "198.18.16.0/30")];
    let opts = |net_admin| StartOptions {
        wrapper: unprivileged(net_admin),
        ..Default::default()
    };

    let without = Nse::start_with(&env, opts(false)).await;
    let e = without.request(req_p()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("needs CAP_NET_ADMIN"),
        "{}",
        e.message()
    );
    assert_eq!(table(nse_netns(&without)), None);
    // Placement sidecar needs nothing.
    let (conn, _) = without
        .request(with_labels(req_ours(), &[("proxy-placement", "sidecar")]))
        .await
        .expect("sidecar without the capability");
    assert!(client_spec(&conn).is_some());

    let with = Nse::start_with(&env, opts(true)).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", with.pid())).unwrap();
    assert!(status.contains("Uid:\t65534"), "not root: {status}");
    let (conn, _) = with
        .request(req_p())
        .await
        .expect("rules with CAP_NET_ADMIN only");
    assert_eq!(captured(nse_netns(&with)), Some(vec![interface(&conn)]));
    with.close(conn).await.unwrap();
    assert_eq!(captured(nse_netns(&with)), Some(vec![]));
}
