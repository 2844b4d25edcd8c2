//! Network functions in chain order, on real traffic: a firewall before the
//! mesh proxy filters what clients send before the proxy sees it (rules in
//! NSM's ACL format); after the proxy it filters what the proxy sends
//! upstream. A function refusing a connection leaves nothing of those
//! before it; Close leaves the endpoint's namespace as it was.

use std::net::SocketAddr;
use std::time::Duration;

use examples::direct_client::DirectClient;
use examples::inspect;
use examples::lab::{self, Lab, LabConfig, SERVER_PORT_2};
use examples::namespace::Namespace;
use examples::proxy::ProxyKind;
use forwarder_plugin::netns::Netns;

/// A directory removed on drop.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `files` into a scratch directory (`$DIR` in them names it) and
/// starts the lab with NSM_CONFIG naming the first.
fn lab_with(files: &[(&str, &str)]) -> (Lab, Scratch) {
    let dir = std::env::temp_dir().join(nsm_tests::unique("chain-config-"));
    std::fs::create_dir_all(&dir).unwrap();
    let scratch = Scratch(dir.clone());
    for (name, text) in files {
        let text = text.replace("$DIR", dir.to_str().unwrap());
        std::fs::write(dir.join(name), text).unwrap();
    }
    let config = dir.join(files[0].0);
    let lab = Lab::start(LabConfig {
        proxy: ProxyKind::Builtin,
        nse_env: vec![("NSM_CONFIG".into(), config.display().to_string())],
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("lab: {e}"));
    (lab, scratch)
}

fn denied_port() -> SocketAddr {
    SocketAddr::new(lab::server_addr().ip(), SERVER_PORT_2)
}

fn client(lab: &Lab) -> (DirectClient, Namespace, Netns) {
    let c = lab.direct_client("chain");
    let ns = lab.client().unwrap();
    let netns = Netns::open(ns.name()).unwrap();
    (c, ns, netns)
}

fn server_saw_port(lab: &Lab, port: u16) -> bool {
    std::fs::read_to_string(lab.dir.join("server.log"))
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("server: ") && l.ends_with(&format!(":{port}")))
}

fn proxy_saw_port(lab: &Lab, port: u16) -> bool {
    lab.proxy_lines().iter().any(|(_, to)| to.port() == port)
}

/// A Request from `netns` for `name` that must succeed.
async fn request(
    lab: &Lab,
    c: &DirectClient,
    netns: &Netns,
    name: &str,
    labels: &[(&str, &str)],
) -> nsm_api::connection::Connection {
    c.request(netns, name, "mesh-proxy", "nsm-1", labels)
        .await
        .unwrap_or_else(|e| panic!("Request: {e}{}", lab.logs()))
}

/// The endpoint's namespace is as it was `before` (within `within`).
#[track_caller]
fn assert_back(lab: &Lab, before: &inspect::NsState, within: Duration, when: &str) {
    if let Err(left) = inspect::wait_nse_back_to(&lab.nse_ns, before, within) {
        panic!("{when}: {left:?}{}", lab.logs());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firewall_before_the_proxy_refuses_what_the_proxy_never_sees() {
    if !nsm_tests::require_root("chain: firewall before the proxy") {
        return;
    }
    // NSM's ACL format (cmd-nse-firewall-vpp): permit TCP 8080, forbid
    // 8081, and — as VPP — deny what no rule permits.
    let (lab, _scratch) = lab_with(&[
        (
            "chain.yaml",
            "version: 2\nfunctions:\n  fw:\n    type: firewall\n    nsmAclFile: $DIR/acl.yaml\n  proxy:\n    type: mesh-proxy\nchains:\n  default: [fw, proxy]\n",
        ),
        (
            "acl.yaml",
            "permit web:\n  ispermit: 1\n  proto: 6\n  srcportoricmptypelast: 65535\n  dstportoricmpcodefirst: 8080\n  dstportoricmpcodelast: 8080\n\
             forbid other:\n  ispermit: 0\n  proto: 6\n  srcportoricmptypelast: 65535\n  dstportoricmpcodefirst: 8081\n  dstportoricmpcodelast: 8081\n",
        ),
    ]);
    let before = inspect::snapshot(&lab.nse_ns).unwrap();
    let (c, ns, netns) = client(&lab);

    // The proxy refuses a label that is not a placement: the firewall,
    // applied before it, must not keep the connection's interface.
    let e = c
        .request(
            &netns,
            "refused",
            "mesh-proxy",
            "nsm-1",
            &[("proxy-placement", "elsewhere")],
        )
        .await
        .expect_err("a bad placement label is refused");
    assert!(e.to_string().contains("proxy-placement"), "{e}");
    assert_back(
        &lab,
        &before,
        Duration::from_secs(5),
        "a refused Request left",
    );

    let conn = request(&lab, &c, &netns, "web-0", &[]).await;
    lab.get_through_proxy(&ns, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the permitted port: {e}"));
    let denied = examples::traffic::http_get(&ns, denied_port(), Duration::from_secs(3));
    assert!(denied.is_err(), "port 8081 got through: {denied:?}");
    assert!(
        !proxy_saw_port(&lab, SERVER_PORT_2),
        "the proxy saw the denied port: {:?}",
        lab.proxy_lines()
    );
    assert!(!server_saw_port(&lab, SERVER_PORT_2));
    // NSM's client pings its endpoint: always allowed.
    let nse_addr = conn
        .context
        .as_ref()
        .unwrap()
        .ip_context
        .as_ref()
        .unwrap()
        .dst_ip_addrs[0]
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    ns.exec(&["ping", "-c", "1", "-W", "2", &nse_addr])
        .unwrap_or_else(|e| panic!("ping {nse_addr}: {e}"));
    let table = lab
        .nse_ns
        .exec(&["nft", "list", "table", "inet", "nsm_firewall"])
        .unwrap();
    assert!(table.contains("tcp dport 8081 reject"), "{table}");

    c.close(&conn).await.unwrap();
    assert_back(&lab, &before, Duration::from_secs(10), "after Close");
    assert!(inspect::link(&ns, "nsm-1").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firewall_after_the_proxy_filters_what_the_proxy_sends() {
    if !nsm_tests::require_root("chain: firewall after the proxy") {
        return;
    }
    let (lab, _scratch) = lab_with(&[(
        "chain.yaml",
        "version: 2\nfunctions:\n  proxy:\n    type: mesh-proxy\n  fw:\n    type: firewall\n    defaultAction: allow\n    rules:\n    - action: deny\n      protocol: tcp\n      destinationPorts: ['8081']\nchains:\n  default: [proxy, fw]\n",
    )]);
    let before = inspect::snapshot(&lab.nse_ns).unwrap();
    let (c, ns, netns) = client(&lab);
    let conn = request(&lab, &c, &netns, "web-0", &[]).await;
    lab.get_through_proxy(&ns, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the allowed port: {e}"));

    // The client's connection reaches the proxy (order: the proxy first),
    // the proxy's own connection upstream is what the firewall drops.
    let denied = examples::traffic::http_get(&ns, denied_port(), Duration::from_secs(3));
    assert!(denied.is_err(), "port 8081 got through: {denied:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !proxy_saw_port(&lab, SERVER_PORT_2) {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy never saw the client's connection to 8081: {:?}{}",
            lab.proxy_lines(),
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!server_saw_port(&lab, SERVER_PORT_2), "{}", lab.logs());
    let table = lab
        .nse_ns
        .exec(&["nft", "list", "table", "inet", "nsm_firewall"])
        .unwrap();
    assert!(table.contains("hook postrouting"), "{table}");

    c.close(&conn).await.unwrap();
    // The firewall's table goes with its last connection.
    assert_back(&lab, &before, Duration::from_secs(10), "after Close");
}

/// The chain comes from NetworkService policy (the first match whose
/// source_selector the connection's labels satisfy names it); a policy
/// change reaches an existing connection at its next refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_service_policy_chooses_the_chain_and_a_change_applies_at_refresh() {
    if !nsm_tests::require_root("chain: policy") {
        return;
    }
    let policy = |app: &str| {
        format!(
            "apiVersion: networkservicemesh.io/v1\nkind: NetworkService\nmetadata:\n  name: mesh-proxy\nspec:\n  payload: IP\n  matches:\n    - source_selector: {{app: {app}}}\n      metadata:\n        labels: {{chain: strict}}\n"
        )
    };
    let web_policy = policy("web");
    let (mut lab, scratch) = lab_with(&[
        (
            "chain.yaml",
            "version: 2\nfunctions:\n  fw:\n    type: firewall\n    defaultAction: allow\n    rules:\n    - action: deny\n      protocol: tcp\n      destinationPorts: ['8081']\n  proxy:\n    type: mesh-proxy\nchains:\n  strict: [fw, proxy]\n  open: [proxy]\ndefaultChain: open\nnetworkServiceFile: $DIR/ns.yaml\n",
        ),
        ("ns.yaml", web_policy.as_str()),
    ]);
    let before = inspect::snapshot(&lab.nse_ns).unwrap();
    let (c, web, web_netns) = client(&lab);
    let db = lab.client().unwrap();
    let db_netns = Netns::open(db.name()).unwrap();
    let web_conn = request(&lab, &c, &web_netns, "web-0", &[("app", "web")]).await;
    let db_conn = request(&lab, &c, &db_netns, "db-0", &[("app", "db")]).await;
    let to_8081 =
        |ns: &Namespace| examples::traffic::http_get(ns, denied_port(), Duration::from_secs(3));
    assert!(
        to_8081(&web).is_err(),
        "app=web is in chain strict: 8081 is denied"
    );
    let ex = to_8081(&db).unwrap_or_else(|e| panic!("app=db is in chain open: {e}{}", lab.logs()));
    assert_eq!(ex.server_saw.ip(), lab::NSE_UPLINK, "through the proxy");
    lab.get_through_proxy(&web, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("8080 in chain strict: {e}"));

    // The platform team moves app=web out of the strict chain.
    std::fs::write(scratch.0.join("ns.yaml"), policy("batch")).unwrap();
    let log_len = lab.nse().unwrap().log().len();
    lab.nse()
        .unwrap()
        .wait_until("the policy reload", Duration::from_secs(10), |p| {
            p.log()[log_len..]
                .contains("NetworkService policy reloaded")
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        to_8081(&web).is_err(),
        "the existing connection keeps its chain until it refreshes"
    );
    let web_conn = c
        .refresh(&web_netns, &web_conn, "nsm-1")
        .await
        .unwrap_or_else(|e| panic!("refresh: {e}{}", lab.logs()));
    let ex = to_8081(&web)
        .unwrap_or_else(|e| panic!("after the refresh, chain open: {e}{}", lab.logs()));
    assert_eq!(ex.server_saw.ip(), lab::NSE_UPLINK);
    // No connection uses the firewall any more: its table is gone.
    assert!(
        lab.nse_ns
            .exec(&["nft", "list", "table", "inet", "nsm_firewall"])
            .is_err(),
        "the firewall's table outlived its last connection"
    );

    c.close(&web_conn).await.unwrap();
    c.close(&db_conn).await.unwrap();
    assert_back(&lab, &before, Duration::from_secs(10), "after Close");
}

/// Traffic the chain ends in the vpn function leaves the endpoint only as
/// WireGuard UDP to the peer (counted on the peer's underlay link: UDP to
/// its WireGuard port, nothing for the server in clear) and reaches a
/// server behind the peer, which sees the endpoint's tunnel address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_vpn_function_sends_leaves_encrypted_to_a_server_behind_the_peer() {
    use examples::vpn_peer::{self, VpnKeys, VpnPeer};
    if !nsm_tests::require_root("chain: vpn") {
        return;
    }
    let keys_dir = Scratch(std::env::temp_dir().join(nsm_tests::unique("vpn-keys-")));
    std::fs::create_dir_all(&keys_dir.0).unwrap();
    let keys = VpnKeys::generate(&keys_dir.0).unwrap();
    let config = format!(
        "version: 2\nfunctions:\n  proxy:\n    type: mesh-proxy\n{}chains:\n  default: [proxy, vpn]\n",
        keys.function_yaml("vpn")
    );
    let (lab, _scratch) = lab_with(&[("chain.yaml", config.as_str())]);
    let peer = VpnPeer::start(&lab.nse_ns, &keys, &keys_dir.0)
        .unwrap_or_else(|e| panic!("the peer: {e}{}", lab.logs()));

    let before = inspect::snapshot(&lab.nse_ns).unwrap();
    let (c, ns, netns) = client(&lab);
    let conn = request(&lab, &c, &netns, "web-0", &[]).await;
    let behind = vpn_peer::behind();
    let ex = examples::traffic::http_get(&ns, behind, Duration::from_secs(5)).unwrap_or_else(|e| {
        panic!(
            "to the server behind the peer: {e}{}{}",
            lab.logs(),
            peer.logs()
        )
    });
    assert_eq!(
        ex.server_saw.ip().to_string(),
        vpn_peer::NSE_TUNNEL_IP,
        "the server sees the endpoint's tunnel address"
    );
    assert!(
        lab.proxy_lines().iter().any(|(_, to)| *to == behind),
        "the proxy carried it: {:?}",
        lab.proxy_lines()
    );
    let (wireguard, clear) = peer.counters().unwrap();
    assert!(
        wireguard >= 3,
        "handshake and data as WireGuard UDP: {wireguard} packets"
    );
    assert_eq!(clear, 0, "nothing for the server in clear on the underlay");

    c.close(&conn).await.unwrap();
    assert_back(&lab, &before, Duration::from_secs(10), "after Close");
}

/// The firewall on the iptables backend (its rules in mangle chains
/// `NSM_FIREWALL_*`): the same filtering; a denied packet is dropped
/// (iptables refuses REJECT outside its filter table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_firewall_on_iptables_filters_the_same() {
    if !nsm_tests::require_root("chain: firewall on iptables") {
        return;
    }
    let (lab, _scratch) = lab_with(&[(
        "chain.yaml",
        "version: 2\nfunctions:\n  fw:\n    type: firewall\n    defaultAction: allow\n    rules:\n    - action: deny\n      protocol: tcp\n      destinationPorts: ['8081']\n    table: {backend: iptables}\n  proxy:\n    type: mesh-proxy\nchains:\n  default: [fw, proxy]\n",
    )]);
    let before = inspect::snapshot(&lab.nse_ns).unwrap();
    let (c, ns, netns) = client(&lab);
    let conn = request(&lab, &c, &netns, "web-0", &[]).await;
    lab.get_through_proxy(&ns, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the allowed port: {e}"));
    let denied = examples::traffic::http_get(&ns, denied_port(), Duration::from_secs(2));
    assert!(denied.is_err(), "port 8081 got through: {denied:?}");
    assert!(
        !proxy_saw_port(&lab, SERVER_PORT_2),
        "the proxy saw the denied port"
    );
    let saved = lab.nse_ns.exec(&["iptables-save", "-t", "mangle"]).unwrap();
    assert!(
        saved.contains("NSM_FIREWALL_FIREWALL")
            && saved.contains("--dport 8081")
            && saved.contains("-j DROP"),
        "{saved}"
    );
    c.close(&conn).await.unwrap();
    assert_back(&lab, &before, Duration::from_secs(10), "after Close");
}
