//! forwarder-plugin's links module against the real kernel: veth pairs
//! plumbed between namespaces this suite creates (198.18.0.0/15, fd00::/8),
//! checked with `ip -j` and real TCP traffic; idempotency, conflicts,
//! rollback, teardown, bad input; and the netns handle it relies on.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use forwarder_plugin::link::{
    LinkError, Links, NeighbourSpec, RouteSpec, VethEnd, VethPlan, VethSpec, plumb_veth, unplumb,
};
use forwarder_plugin::netns::{Netns, NetnsError};
use nsm_tests::{netns::TestNetns, process::ChildGuard, require_root, unique};
use serde_json::Value;

const B_MAC: &str = "02:fe:00:00:00:02";

/// A namespace made with `Netns::create_named`, deleted on drop.
struct Ns {
    name: String,
    netns: Netns,
}

impl Ns {
    fn new(prefix: &str) -> Ns {
        let name = unique(prefix);
        let netns = Netns::create_named(&name).expect("create_named");
        Ns { name, netns }
    }

    /// `ip -n <ns> -j <args>` parsed; an empty reply is an empty array.
    fn ip(&self, args: &[&str]) -> Value {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-j"])
            .args(args)
            .output()
            .expect("spawn ip");
        assert!(
            out.status.success(),
            "ip {args:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Value::Array(vec![]);
        }
        serde_json::from_slice(&out.stdout).expect("ip -j output is JSON")
    }

    fn sh(&self, args: &[&str]) {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("spawn ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn link_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .ip(&["link", "show"])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    }

    /// Global addresses of `dev` as "ip/prefix", sorted.
    fn addrs(&self, dev: &str) -> Vec<String> {
        let v = self.ip(&["addr", "show", "dev", dev]);
        let mut out: Vec<String> = v[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["scope"] != "link")
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect();
        out.sort();
        out
    }

    /// Routes out of `dev` that are not the kernel's own (address prefix
    /// routes, link-local, local table), as "dst [via gw] [onlink] [table t]".
    fn routes(&self, dev: &str) -> Vec<String> {
        let mut out = Vec::new();
        for fam in ["-4", "-6"] {
            for r in self
                .ip(&[fam, "route", "show", "table", "all", "dev", dev])
                .as_array()
                .unwrap()
            {
                if r.get("type").is_some_and(|t| t != "unicast") || r["protocol"] == "kernel" {
                    continue;
                }
                assert_eq!(r["protocol"], "static", "route not made by us: {r}");
                let mut dst = r["dst"].as_str().unwrap().to_owned();
                if !dst.contains('/') {
                    dst += if dst.contains(':') { "/128" } else { "/32" };
                }
                let mut s = dst;
                if let Some(gw) = r.get("gateway") {
                    s += &format!(" via {}", gw.as_str().unwrap());
                }
                if r["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|f| f == "onlink"))
                {
                    s += " onlink";
                }
                if let Some(t) = r.get("table") {
                    s += &format!(" table {}", t.as_str().unwrap());
                }
                out.push(s);
            }
        }
        out.sort();
        out
    }

    /// What a test compares before/after: links (name, kind, MTU, MAC, up,
    /// peer), global addresses, every route but the kernel's link-local and
    /// multicast ones, permanent neighbours. (Not raw `ip -j` output: DAD of
    /// link-local addresses and counters change on their own.)
    fn snapshot(&self) -> Vec<String> {
        let mut out = Vec::new();
        for l in self.ip(&["-d", "link", "show"]).as_array().unwrap() {
            let up = l["flags"].as_array().unwrap().iter().any(|f| f == "UP");
            out.push(format!(
                "link {} kind={} mtu={} mac={} up={up} peer={}",
                l["ifname"], l["linkinfo"]["info_kind"], l["mtu"], l["address"], l["link_index"]
            ));
        }
        for l in self.ip(&["addr", "show"]).as_array().unwrap() {
            for a in l["addr_info"].as_array().unwrap() {
                if a["scope"] != "link" {
                    out.push(format!(
                        "addr {} {}/{}",
                        l["ifname"], a["local"], a["prefixlen"]
                    ));
                }
            }
        }
        for fam in ["-4", "-6"] {
            for r in self
                .ip(&[fam, "route", "show", "table", "all"])
                .as_array()
                .unwrap()
            {
                if r["dst"] == "fe80::/64" || r["dst"] == "ff00::/8" {
                    continue;
                }
                out.push(format!(
                    "route {} {} via={} dev={} table={} type={} flags={}",
                    r["protocol"],
                    r["dst"],
                    r["gateway"],
                    r["dev"],
                    r["table"],
                    r["type"],
                    r["flags"]
                ));
            }
            for n in self.ip(&[fam, "neigh", "show"]).as_array().unwrap() {
                if n["state"][0] == "PERMANENT" {
                    out.push(format!("neigh {} {} {}", n["dev"], n["dst"], n["lladdr"]));
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Netns::delete_named(&self.name);
    }
}

fn end(ns: &str, name: &str) -> VethEnd {
    VethEnd {
        netns: ns.to_owned(),
        name: name.to_owned(),
        mac: None,
        addresses: vec![],
        routes: vec![],
        neighbours: vec![],
    }
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

/// NSM's point-to-point shape: /32 (/128) on each side, a route to the
/// peer's address, a route via the peer (onlink), permanent IPv6 neighbours.
/// End b is named by path, end a by name, to exercise both.
fn plan(client: &Ns, endpoint: &Ns, a: &str, b: &str) -> VethPlan {
    let mut pa = end(&client.name, a);
    pa.addresses = vec![net("198.18.0.1/32"), net("fd00::1/128")];
    pa.routes = vec![
        RouteSpec::direct(net("198.18.0.2/32")),
        RouteSpec::direct(net("fd00::2/128")),
        RouteSpec::via_onlink(net("198.18.10.0/24"), "198.18.0.2".parse().unwrap()),
    ];
    pa.neighbours = vec![NeighbourSpec {
        ip: "fd00::2".parse().unwrap(),
        mac: None,
    }];
    let mut pb = end(&format!("/run/netns/{}", endpoint.name), b);
    pb.mac = Some(B_MAC.parse().unwrap());
    pb.addresses = vec![
        net("198.18.0.2/32"),
        net("198.18.10.1/32"),
        net("fd00::2/128"),
    ];
    let mut in_table = RouteSpec::via_onlink(net("198.18.20.0/24"), "198.18.0.1".parse().unwrap());
    in_table.table = Some(100);
    pb.routes = vec![
        RouteSpec::direct(net("198.18.0.1/32")),
        RouteSpec::direct(net("fd00::1/128")),
        in_table,
    ];
    pb.neighbours = vec![NeighbourSpec {
        ip: "fd00::1".parse().unwrap(),
        mac: None,
    }];
    VethPlan {
        a: pa,
        b: pb,
        mtu: Some(1400),
        ipv6_nodad: true,
    }
}

/// Connects from namespace `from` to a listener bound in `to` at `addr`,
/// sends a line and expects it echoed.
fn tcp_echo(from: &Netns, to: &Netns, addr: &str) -> Result<(), String> {
    let bind: SocketAddr = addr.parse().unwrap();
    let listener = to
        .run(|| TcpListener::bind(bind))
        .unwrap()
        .map_err(|e| format!("bind {addr}: {e}"))?;
    let target = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut s, _) = loop {
            match listener.accept() {
                Ok(c) => break c,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Err(e),
            }
        };
        s.set_nonblocking(false)?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        s.write_all(&buf)
    });
    let client = from
        .run(|| -> std::io::Result<[u8; 5]> {
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(b"hello")?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf)?;
            Ok(buf)
        })
        .unwrap();
    let served = server.join().unwrap();
    match (client, served) {
        (Ok(buf), Ok(())) if &buf == b"hello" => Ok(()),
        (c, s) => Err(format!("to {target}: client {c:?}, server {s:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plumbed_veth_has_exactly_what_was_asked_and_carries_traffic() {
    if !require_root("plumbed_veth_has_exactly_what_was_asked_and_carries_traffic") {
        return;
    }
    let (client, endpoint) = (Ns::new("lc-"), Ns::new("le-"));
    let (a, b) = (unique("va"), unique("vb"));
    let p = plan(&client, &endpoint, &a, &b);
    let done = plumb_veth(&p).await.expect("plumb");
    assert!(done.changed);
    assert_eq!(done.a.netns, client.netns.id());
    assert_eq!(done.b.netns, endpoint.netns.id());
    assert_eq!(done.b.mac.unwrap().to_string(), B_MAC);

    // The pair: veth, peer directly in the other namespace, MTU, MAC, up.
    let la = &client.ip(&["-d", "link", "show", "dev", &a])[0];
    let lb = &endpoint.ip(&["-d", "link", "show", "dev", &b])[0];
    assert_eq!(la["linkinfo"]["info_kind"], "veth");
    assert_eq!(lb["linkinfo"]["info_kind"], "veth");
    assert_eq!(la["link_index"], lb["ifindex"], "a's peer is b");
    assert_eq!(lb["link_index"], la["ifindex"], "b's peer is a");
    assert!(
        la.get("link_netnsid").is_some(),
        "peer is in another netns: {la}"
    );
    assert_eq!(la["ifindex"].as_u64(), Some(u64::from(done.a.index)));
    assert_eq!(
        (la["mtu"].as_u64(), lb["mtu"].as_u64()),
        (Some(1400), Some(1400))
    );
    assert_eq!(lb["address"], B_MAC);
    for l in [la, lb] {
        assert!(
            l["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
            "{l}"
        );
    }
    assert_eq!(client.link_names(), ["lo".to_owned(), a.clone()]);
    assert_eq!(endpoint.link_names(), ["lo".to_owned(), b.clone()]);

    assert_eq!(client.addrs(&a), ["198.18.0.1/32", "fd00::1/128"]);
    assert_eq!(
        endpoint.addrs(&b),
        ["198.18.0.2/32", "198.18.10.1/32", "fd00::2/128"]
    );
    assert_eq!(
        client.routes(&a),
        [
            "198.18.0.2/32",
            "198.18.10.0/24 via 198.18.0.2 onlink",
            "fd00::2/128"
        ]
    );
    assert_eq!(
        endpoint.routes(&b),
        [
            "198.18.0.1/32",
            "198.18.20.0/24 via 198.18.0.1 onlink table 100",
            "fd00::1/128"
        ]
    );
    let neigh = client.ip(&["-6", "neigh", "show", "dev", &a]);
    let n = neigh
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["dst"] == "fd00::2")
        .unwrap_or_else(|| panic!("no neighbour fd00::2: {neigh}"));
    assert_eq!(n["lladdr"], B_MAC);
    assert_eq!(n["state"][0], "PERMANENT");
    let neigh = endpoint.ip(&["-6", "neigh", "show", "dev", &b]);
    assert!(
        neigh
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["dst"] == "fd00::1"
                && n["lladdr"] == la["address"]
                && n["state"][0] == "PERMANENT"),
        "{neigh}"
    );

    // Traffic: IPv4 to the peer, IPv4 through the onlink gateway route,
    // IPv6 (no DAD wait), and back the other way.
    tcp_echo(&client.netns, &endpoint.netns, "198.18.0.2:0").unwrap();
    tcp_echo(&client.netns, &endpoint.netns, "198.18.10.1:0").unwrap();
    tcp_echo(&client.netns, &endpoint.netns, "[fd00::2]:0").unwrap();
    tcp_echo(&endpoint.netns, &client.netns, "198.18.0.1:0").unwrap();
    tcp_echo(&endpoint.netns, &client.netns, "[fd00::1]:0").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plumbing_twice_is_a_no_op() {
    if !require_root("plumbing_twice_is_a_no_op") {
        return;
    }
    let (client, endpoint) = (Ns::new("lc-"), Ns::new("le-"));
    let p = plan(&client, &endpoint, &unique("va"), &unique("vb"));
    let first = plumb_veth(&p).await.unwrap();
    let before = (client.snapshot(), endpoint.snapshot());
    let second = plumb_veth(&p).await.unwrap();
    assert!(!second.changed, "nothing left to do the second time");
    assert_eq!(
        (second.a.index, second.b.index),
        (first.a.index, first.b.index)
    );
    assert_eq!((client.snapshot(), endpoint.snapshot()), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplumb_removes_everything_and_is_idempotent() {
    if !require_root("unplumb_removes_everything_and_is_idempotent") {
        return;
    }
    let (client, endpoint) = (Ns::new("lc-"), Ns::new("le-"));
    let (a, b) = (unique("va"), unique("vb"));
    let p = plan(&client, &endpoint, &a, &b);
    let pristine = (client.snapshot(), endpoint.snapshot());
    plumb_veth(&p).await.unwrap();
    unplumb(&p).await.expect("unplumb");
    assert_eq!(client.link_names(), ["lo"]);
    assert_eq!(endpoint.link_names(), ["lo"]);
    // Addresses, routes (incl. table 100) and neighbours went with the links.
    assert_eq!((client.snapshot(), endpoint.snapshot()), pristine);
    unplumb(&p).await.expect("unplumb twice");

    // With one namespace gone, unplumb is still fine.
    plumb_veth(&p).await.unwrap();
    let mut gone = p.clone();
    gone.b.netns = unique("nsm-gone-");
    unplumb(&gone).await.expect("peer namespace missing");
    assert_eq!(client.link_names(), ["lo"]);
}

fn expect_conflict<T: std::fmt::Debug>(r: Result<T, LinkError>, who: &str, what: &str) {
    match r {
        Err(LinkError::LinkConflict { name, why }) => {
            assert_eq!(name, who, "{why}");
            assert!(why.contains(what), "{why:?} should say {what:?}");
        }
        other => panic!("expected LinkConflict, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_different_link_is_a_conflict_and_nothing_changes() {
    if !require_root("an_existing_different_link_is_a_conflict_and_nothing_changes") {
        return;
    }
    let (client, endpoint) = (Ns::new("lc-"), Ns::new("le-"));
    let (a, b) = (unique("va"), unique("vb"));
    let p = plan(&client, &endpoint, &a, &b);

    // Same name, not a veth.
    client.sh(&["link", "add", &a, "type", "bridge"]);
    let before = (client.snapshot(), endpoint.snapshot());
    expect_conflict(plumb_veth(&p).await, &a, "bridge");
    assert_eq!((client.snapshot(), endpoint.snapshot()), before);
    // unplumb refuses to delete someone else's link.
    expect_conflict(unplumb(&p).await, &a, "bridge");
    assert_eq!(client.link_names(), ["lo".to_owned(), a.clone()]);
    client.sh(&["link", "del", &a]);

    // Same name, a veth, but its peer is another link in the same namespace.
    client.sh(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
    let before = (client.snapshot(), endpoint.snapshot());
    expect_conflict(plumb_veth(&p).await, &a, "peer is not");
    assert_eq!((client.snapshot(), endpoint.snapshot()), before);
    client.sh(&["link", "del", &a]);

    // The peer's name is taken in the peer namespace.
    endpoint.sh(&["link", "add", &b, "type", "bridge"]);
    let before = (client.snapshot(), endpoint.snapshot());
    expect_conflict(plumb_veth(&p).await, &b, "peer name is taken");
    assert_eq!((client.snapshot(), endpoint.snapshot()), before);
    endpoint.sh(&["link", "del", &b]);

    // The right pair, with another MTU.
    let mut other_mtu = p.clone();
    other_mtu.mtu = Some(1300);
    plumb_veth(&other_mtu).await.unwrap();
    let before = (client.snapshot(), endpoint.snapshot());
    expect_conflict(plumb_veth(&p).await, &a, "MTU");
    assert_eq!((client.snapshot(), endpoint.snapshot()), before);
    // ...which unplumb still recognises as the plan's pair.
    unplumb(&p).await.unwrap();
    assert_eq!(endpoint.link_names(), ["lo"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_half_way_rolls_back_everything_it_did() {
    if !require_root("a_failure_half_way_rolls_back_everything_it_did") {
        return;
    }
    let (client, endpoint) = (Ns::new("lc-"), Ns::new("le-"));
    let (a, b) = (unique("va"), unique("vb"));
    let pristine = (client.snapshot(), endpoint.snapshot());

    // The last step fails: a gateway that is not on the link (no onlink, no
    // connected route). Link, addresses, up, earlier routes: all undone.
    let mut p = plan(&client, &endpoint, &a, &b);
    p.b.routes.push(RouteSpec {
        dst: net("198.18.30.0/24"),
        via: Some("198.18.99.1".parse().unwrap()),
        onlink: false,
        table: None,
        metric: None,
    });
    let err = plumb_veth(&p).await.expect_err("unreachable gateway");
    assert_eq!(err.errno(), Some(ENETUNREACH), "{err}");
    assert!(
        err.to_string().contains("198.18.30.0/24 via 198.18.99.1"),
        "{err}"
    );
    assert_eq!((client.snapshot(), endpoint.snapshot()), pristine);

    // When the pair already existed, only this call's additions are undone:
    // the extra address and route go, the pair and its plan stay.
    let good = plan(&client, &endpoint, &a, &b);
    plumb_veth(&good).await.unwrap();
    let plumbed = (client.snapshot(), endpoint.snapshot());
    let mut more = good.clone();
    more.a.addresses.push(net("198.18.0.9/32"));
    more.a.routes.push(RouteSpec::direct(net("198.18.40.0/24")));
    more.a.routes.push(RouteSpec {
        dst: net("198.18.50.0/24"),
        via: Some("198.18.99.1".parse().unwrap()),
        onlink: false,
        table: None,
        metric: None,
    });
    plumb_veth(&more).await.expect_err("unreachable gateway");
    assert_eq!((client.snapshot(), endpoint.snapshot()), plumbed);
}

/// Linux's errno for "Network is unreachable".
const ENETUNREACH: i32 = 101;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_before_any_change() {
    if !require_root("bad_input_is_rejected_before_any_change") {
        return;
    }
    let (client, endpoint) = (Ns::new("lc-"), Ns::new("le-"));
    let pristine = (client.snapshot(), endpoint.snapshot());
    for bad in [
        "0123456789abcdef",
        "a/b",
        "a b",
        "a\tb",
        "a\u{7}",
        "",
        "eth0:1",
    ] {
        for (a, b) in [(bad, "okname"), ("okname", bad)] {
            let p = plan(&client, &endpoint, a, b);
            match plumb_veth(&p).await {
                Err(LinkError::InvalidName { name, .. }) => assert_eq!(name, bad),
                other => panic!("{bad:?}: expected InvalidName, got {other:?}"),
            }
            assert!(matches!(
                unplumb(&p).await,
                Err(LinkError::InvalidName { .. })
            ));
        }
    }
    // Values the kernel would take in some other sense, or refuse half way.
    let (a, b) = (unique("va"), unique("vb"));
    let mut wrong_family = plan(&client, &endpoint, &a, &b);
    wrong_family.b.routes.push(RouteSpec::via_onlink(
        net("fd00:1::/64"),
        "198.18.0.1".parse().unwrap(),
    ));
    let mut host_bits = plan(&client, &endpoint, &a, &b);
    host_bits
        .a
        .routes
        .push(RouteSpec::direct(net("198.18.0.2/24")));
    let mut bad_mtu = plan(&client, &endpoint, &a, &b);
    bad_mtu.mtu = Some(40);
    let mut bad_addr = plan(&client, &endpoint, &a, &b);
    bad_addr.a.addresses.push(net("224.0.0.1/32"));
    for (what, p) in [
        ("gateway family", wrong_family),
        ("host bits", host_bits),
        ("MTU", bad_mtu),
        ("multicast address", bad_addr),
    ] {
        match plumb_veth(&p).await {
            Err(LinkError::InvalidRequest(msg)) => eprintln!("{what}: {msg}"),
            other => panic!("{what}: expected InvalidRequest, got {other:?}"),
        }
    }
    // Both ends with one name in one namespace.
    let mut same = plan(&client, &endpoint, &a, &a);
    same.b.netns = client.name.clone();
    assert!(matches!(
        plumb_veth(&same).await,
        Err(LinkError::InvalidRequest(_))
    ));
    assert_eq!((client.snapshot(), endpoint.snapshot()), pristine);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_namespaces_fail_clearly() {
    if !require_root("missing_or_wrong_namespaces_fail_clearly") {
        return;
    }
    let missing = unique("nsm-nope-");
    match Netns::open(&missing) {
        Err(e @ NetnsError::NotFound { .. }) => assert!(e.to_string().contains(&missing), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        Netns::open("/etc/hostname"),
        Err(NetnsError::NotNetns { .. })
    ));
    assert!(matches!(
        Netns::open("/proc/self/ns/uts"),
        Err(NetnsError::NotNetns { .. })
    ));
    assert!(matches!(
        Netns::open("/nonexistent/ns"),
        Err(NetnsError::NotFound { .. })
    ));

    let endpoint = Ns::new("le-");
    let mut p = plan(&endpoint, &endpoint, &unique("va"), &unique("vb"));
    p.a.netns = missing.clone();
    match plumb_veth(&p).await {
        Err(LinkError::Netns(NetnsError::NotFound { spec })) => assert_eq!(spec, missing),
        other => panic!("{other:?}"),
    }
    assert_eq!(endpoint.link_names(), ["lo"]);
    p.b.netns = "/etc/hostname".into();
    p.a.netns = endpoint.name.clone();
    assert!(matches!(
        plumb_veth(&p).await,
        Err(LinkError::Netns(NetnsError::NotNetns { .. }))
    ));
    // Nothing to remove where there is no namespace.
    p.a.netns = missing;
    unplumb(&p).await.unwrap();

    // A handle needs a runtime to drive its socket.
    let ns = endpoint.netns.try_clone().unwrap();
    let no_rt = std::thread::spawn(move || Links::open(&ns).map(|_| ()))
        .join()
        .unwrap();
    assert!(matches!(no_rt, Err(LinkError::NoRuntime)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_objects_are_idempotent_one_by_one() {
    if !require_root("links_objects_are_idempotent_one_by_one") {
        return;
    }
    let (ca, cb) = (Ns::new("lc-"), Ns::new("le-"));
    let (la, lb) = (
        Links::open(&ca.netns).unwrap(),
        Links::open(&cb.netns).unwrap(),
    );
    let (a, b) = (unique("va"), unique("vb"));
    assert_eq!(la.link(&a).await.unwrap(), None);
    let mut spec = VethSpec::new(&a, &b);
    spec.mtu = Some(9000);
    let pair = la.add_veth(&spec, &lb).await.unwrap();
    assert!(pair.created);
    assert_eq!(pair.local.kind.as_deref(), Some("veth"));
    assert_eq!(pair.peer.peer_index, Some(pair.local.index));
    assert_eq!(
        pair.local.peer_nsid,
        la.nsid_of(lb.netns()).await.unwrap(),
        "a's peer is in b's namespace"
    );
    assert!(!la.add_veth(&spec, &lb).await.unwrap().created);
    let found = la.link(&a).await.unwrap().unwrap();
    assert_eq!(
        (found.index, found.mtu, found.up),
        (pair.local.index, Some(9000), false)
    );
    assert_eq!(
        la.link_by_index(found.index).await.unwrap().unwrap().name,
        a
    );

    let i = found.index;
    la.set_up(i).await.unwrap();
    assert!(la.link(&a).await.unwrap().unwrap().up);
    la.set_down(i).await.unwrap();
    assert!(!la.link(&a).await.unwrap().unwrap().up);
    la.set_up(i).await.unwrap();

    let opts = forwarder_plugin::link::AddrOptions { nodad: true };
    assert!(la.add_address(i, net("fd00::1/64"), opts).await.unwrap());
    assert!(!la.add_address(i, net("fd00::1/64"), opts).await.unwrap());
    assert!(matches!(
        la.add_address(i, net("fd00::1/80"), opts).await,
        Err(LinkError::Conflict { .. })
    ));
    assert!(la.add_address(i, net("198.18.0.1/32"), opts).await.unwrap());
    assert!(!la.add_address(i, net("198.18.0.1/32"), opts).await.unwrap());
    let mut got = la.addresses(i).await.unwrap();
    got.retain(|n| !n.addr().to_string().starts_with("fe80"));
    got.sort();
    assert_eq!(got, [net("198.18.0.1/32"), net("fd00::1/64")]);

    let gw = RouteSpec::via_onlink(net("198.18.5.0/24"), "198.18.0.2".parse().unwrap());
    assert!(la.add_route(i, &gw).await.unwrap());
    assert!(!la.add_route(i, &gw).await.unwrap());
    let other_gw = RouteSpec::via_onlink(net("198.18.5.0/24"), "198.18.0.3".parse().unwrap());
    match la.add_route(i, &other_gw).await {
        Err(LinkError::Conflict { why, .. }) => assert!(why.contains("198.18.0.2"), "{why}"),
        other => panic!("{other:?}"),
    }
    let mut in_table = RouteSpec::direct(net("198.18.6.0/24"));
    in_table.table = Some(1000); // beyond a u8: RTA_TABLE only
    assert!(la.add_route(i, &in_table).await.unwrap());
    assert!(!la.add_route(i, &in_table).await.unwrap());
    let routes = la.routes(i).await.unwrap();
    assert!(
        routes.contains(&gw) && routes.contains(&in_table),
        "{routes:?}"
    );
    assert_eq!(
        ca.routes(&a),
        [
            "198.18.5.0/24 via 198.18.0.2 onlink",
            "198.18.6.0/24 table 1000"
        ]
    );
    assert!(la.del_route(i, &gw).await.unwrap());
    assert!(!la.del_route(i, &gw).await.unwrap());
    assert!(la.del_route(i, &in_table).await.unwrap());

    let ip = "198.18.0.2".parse().unwrap();
    let mac = "02:00:00:00:00:aa".parse().unwrap();
    assert!(la.add_neighbour(i, ip, mac).await.unwrap());
    assert!(!la.add_neighbour(i, ip, mac).await.unwrap());
    let mac2 = "02:00:00:00:00:bb".parse().unwrap();
    assert!(la.add_neighbour(i, ip, mac2).await.unwrap(), "replaced");
    assert_eq!(la.neighbour(i, ip).await.unwrap(), Some((Some(mac2), true)));
    assert!(la.del_neighbour(i, ip).await.unwrap());
    assert!(!la.del_neighbour(i, ip).await.unwrap());

    assert!(la.del_address(i, net("fd00::1/64")).await.unwrap());
    assert!(!la.del_address(i, net("fd00::1/64")).await.unwrap());

    assert!(la.delete_link(&a).await.unwrap());
    assert!(!la.delete_link(&a).await.unwrap());
    assert_eq!(
        lb.link(&b).await.unwrap(),
        None,
        "deleting one end removes both"
    );

    // Create-then-move (the slow way, kept for benchmarks) lands in the same place.
    let local = VethSpec::new(&a, &b);
    la.add_veth(&local, &la).await.unwrap();
    la.move_link(&b, lb.netns()).await.unwrap();
    assert!(lb.link(&b).await.unwrap().is_some());
    assert!(
        !la.add_veth(&VethSpec::new(&a, &b), &lb)
            .await
            .unwrap()
            .created
    );
}

#[test]
fn create_named_and_delete_named() {
    if !require_root("create_named_and_delete_named") {
        return;
    }
    let name = unique("nsm-cn-");
    let ns = Netns::create_named(&name).unwrap();
    let root = Netns::current().unwrap().id();
    assert_ne!(ns.id(), root);
    assert_eq!(Netns::open(&name).unwrap().id(), ns.id());
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&name));
    // A fresh namespace: only a (down) loopback.
    let links = Command::new("ip")
        .args(["-n", &name, "-j", "link", "show"])
        .output()
        .unwrap();
    let links: Value = serde_json::from_slice(&links.stdout).unwrap();
    assert_eq!(links.as_array().unwrap().len(), 1, "{links}");
    assert!(matches!(
        Netns::create_named(&name),
        Err(NetnsError::Exists { .. })
    ));
    assert!(matches!(
        Netns::create_named("a/b"),
        Err(NetnsError::BadName(_))
    ));
    Netns::delete_named(&name).unwrap();
    assert!(!std::path::Path::new("/run/netns").join(&name).exists());
    assert!(matches!(
        Netns::open(&name),
        Err(NetnsError::NotFound { .. })
    ));
    assert!(matches!(
        Netns::delete_named(&name),
        Err(NetnsError::NotFound { .. })
    ));
    // The open handle still keeps the namespace itself alive.
    assert_eq!(ns.run(|| Netns::current().unwrap().id()).unwrap(), ns.id());
}

#[test]
fn find_by_inode_finds_named_and_process_namespaces() {
    if !require_root("find_by_inode_finds_named_and_process_namespaces") {
        return;
    }
    let t = TestNetns::new("lf-");
    let id = Netns::open(&t.path()).unwrap().id();
    assert_eq!(Netns::find(id).unwrap().id(), id);
    assert_eq!(Netns::open(&id.to_string()).unwrap().id(), id);

    // A namespace only a process holds (not under /run/netns).
    let child = ChildGuard::spawn(Command::new("unshare").args(["--net", "sleep", "30"]));
    let root = Netns::current().unwrap().id();
    let path = format!("/proc/{}/ns/net", child.pid());
    let deadline = Instant::now() + Duration::from_secs(5);
    let pid_ns = loop {
        // unshare switches namespace just before exec'ing sleep.
        let ns = Netns::open(&path).unwrap();
        if ns.id() != root || Instant::now() > deadline {
            break ns;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_ne!(pid_ns.id(), root, "child never left the root netns");
    let found = Netns::find(pid_ns.id()).unwrap();
    assert_eq!(found.id(), pid_ns.id());
    drop(child);
}

#[test]
fn run_inside_a_runtime_never_moves_other_tasks() {
    if !require_root("run_inside_a_runtime_never_moves_other_tasks") {
        return;
    }
    let other = Ns::new("lr-");
    let root = Netns::current().unwrap().id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let (seen, inner) = rt.block_on(async {
        let mut readers = Vec::new();
        for _ in 0..200 {
            readers.push(tokio::spawn(async {
                let mut ids = Vec::new();
                for _ in 0..5 {
                    ids.push(Netns::current().unwrap().id());
                    tokio::task::yield_now().await;
                }
                ids
            }));
        }
        let mut runners = Vec::new();
        for _ in 0..50 {
            let ns = other.netns.try_clone().unwrap();
            // Called straight from a task on a runtime worker, as careless
            // code would: the switch must still stay off the worker thread.
            runners.push(tokio::spawn(async move {
                ns.run(|| Netns::current().unwrap().id()).unwrap()
            }));
        }
        let mut seen = Vec::new();
        for r in readers {
            seen.extend(r.await.unwrap());
        }
        let mut inner = Vec::new();
        for r in runners {
            inner.push(r.await.unwrap());
        }
        (seen, inner)
    });
    assert_eq!(seen.len(), 1000);
    let wrong = seen.iter().filter(|id| **id != root).count();
    assert_eq!(wrong, 0, "{wrong} of 1000 reads saw another namespace");
    assert!(inner.iter().all(|id| *id == other.netns.id()));
    assert_eq!(Netns::current().unwrap().id(), root);
}
