//! `forwarder-plugin serve` as NSM's forwarder hop, against the real
//! kernel: a test client passes its namespace fd, a fake endpoint answers
//! with fixed addresses (198.18.0.0/15) and its own namespace fd, and the
//! hop plumbs a veth between the two namespaces — checked with `ip -j`,
//! `nft` and TCP across it; refresh, Close, expiry, restart adoption, the
//! client-side redirect rules the endpoint asks for, and every refusal
//! leaving both namespaces as they were.

mod hop_support;

use std::time::{Duration, Instant};

use hop_support::*;
use nsm_api::inode::InodeUrl;
use nsm_api::mechanism::{self as mech, MechanismExt, keys};
use nsm_tests::netns::TestNetns;
use nsm_tests::process::fd_count;
use nsm_tests::require_root;
use tonic::Code;

const TTL: Duration = Duration::from_secs(600);

struct Setup {
    dir: TempDir,
    client_ns: TestNetns,
    endpoint_ns: TestNetns,
    nse: FakeEndpoint,
    hop: Hop,
    client: TestClient,
}

async fn setup(behaviour: Behaviour, args: &[&str], env: &[(&str, &str)]) -> Setup {
    let dir = TempDir::new();
    let client_ns = TestNetns::new("hc");
    let endpoint_ns = TestNetns::new("he");
    let nse = FakeEndpoint::start(dir.path(), &endpoint_ns, behaviour).await;
    let hop = Hop::start(dir.path(), &nse.url(), args, env);
    let client = TestClient::new(&hop.socket);
    Setup {
        dir,
        client_ns,
        endpoint_ns,
        nse,
        hop,
        client,
    }
}

impl Setup {
    async fn request(
        &self,
        conn: nsm_api::connection::Connection,
    ) -> Result<nsm_api::connection::Connection, tonic::Status> {
        self.client
            .request(conn, "nsm-1", ClientNetns::Fd(&self.client_ns), TTL, WAIT)
            .await
    }

    fn snapshots(&self) -> (String, String) {
        (snapshot(&self.client_ns), snapshot(&self.endpoint_ns))
    }

    fn assert_pristine(&self, before: &(String, String), what: &str) {
        let after = self.snapshots();
        let log = self.hop.log();
        assert_same(
            &before.0,
            &after.0,
            &format!("{what}: the client namespace changed\n{log}"),
        );
        assert_same(
            &before.1,
            &after.1,
            &format!("{what}: the endpoint namespace changed\n{log}"),
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plumbs_refreshes_and_closes_like_an_nsm_forwarder() {
    if !require_root("plumbs_refreshes_and_closes_like_an_nsm_forwarder") {
        return;
    }
    let s = setup(Behaviour::default(), &[], &[("NSM_NAME", "fwd-test")]).await;
    let pristine = s.snapshots();
    let fds_before = fd_count(s.hop.child.pid());

    let conn = s
        .request(s.client.first())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", s.hop.log()));

    // The client's own mechanism comes back (name, its netns).
    assert_eq!(
        kernel_name(conn.mechanism.as_ref()).as_deref(),
        Some("nsm-1")
    );
    assert_eq!(conn.id, s.client.id, "the caller's id is restored");
    assert_eq!(conn.path.as_ref().unwrap().index, 0);
    // Path: client, forwarder (with a JWT and expiry), endpoint.
    let segs = segments(&conn);
    let names: Vec<_> = conn
        .path
        .as_ref()
        .unwrap()
        .path_segments
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["test-client", "fwd-test", "fake-nse"]);
    let fwd = &segs["fwd-test"];
    assert_eq!(fwd.token.split('.').count(), 3, "a JWT: {:?}", fwd.token);
    assert!(fwd.expires.is_some());
    assert!(!fwd.id.is_empty() && fwd.id != s.client.id);

    // The endpoint got an empty KERNEL preference, our token, and our segment.
    let reqs = s.nse.requests();
    assert_eq!(reqs.len(), 1);
    let (req, token) = &reqs[0];
    assert_eq!(req.mechanism_preferences.len(), 1);
    let pref = &req.mechanism_preferences[0];
    assert_eq!(
        (pref.cls.as_str(), pref.r#type.as_str()),
        ("LOCAL", "KERNEL")
    );
    assert!(pref.parameters.is_empty(), "{pref:?}");
    // The per-RPC token is the hop's own, fresh for this call.
    let sub = |t: &str| nsm_api::authorize::decode(t).map(|c| c.sub).ok();
    assert_eq!(
        token.as_deref().and_then(sub),
        Some("fwd-test".to_owned()),
        "{token:?}"
    );
    assert_eq!(sub(&fwd.token), Some("fwd-test".to_owned()));
    assert_eq!(req.connection.as_ref().unwrap().id, fwd.id);

    // Client end: nsm-1 with the src address and src routes.
    assert_eq!(addrs(&s.client_ns, "nsm-1"), [format!("{CLIENT_IP}/32")]);
    assert_eq!(
        routes(&s.client_ns, "nsm-1"),
        [
            format!("{ENDPOINT_IP}/32"),
            format!("{FAR_NET} via {ENDPOINT_IP}")
        ]
    );
    assert_eq!(link(&s.client_ns, "nsm-1").unwrap()["mtu"], 1500);
    // Endpoint end: the endpoint's name, dst address and dst routes.
    assert_eq!(
        addrs(&s.endpoint_ns, &s.nse.ifname),
        [format!("{ENDPOINT_IP}/32")]
    );
    assert_eq!(
        routes(&s.endpoint_ns, &s.nse.ifname),
        [
            format!("{CLIENT_IP}/32"),
            format!("{NEAR_NET} via {CLIENT_IP}")
        ]
    );

    // Traffic flows both ways across the veth.
    let listener = listen_in(&s.endpoint_ns, &format!("{ENDPOINT_IP}:7000"));
    let (echoed, peer) = echo(
        &listener,
        &s.client_ns,
        &format!("{ENDPOINT_IP}:7000"),
        b"across the hop",
    );
    assert_eq!(echoed, b"across the hop");
    assert_eq!(peer.ip().to_string(), CLIENT_IP);

    // The state directory records the connection under our segment's id.
    let state = s.hop.state();
    let rec = &state["connections"][&fwd.id];
    assert_eq!(rec["plan"]["a"]["name"], "nsm-1");
    assert_eq!(rec["backend"], "nft");

    // Refresh: the same connection again changes nothing.
    let (ci, ei) = (
        ifindex(&s.client_ns, "nsm-1"),
        ifindex(&s.endpoint_ns, &s.nse.ifname),
    );
    let plumbed = s.snapshots();
    let again = s
        .request(conn.clone())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", s.hop.log()));
    assert_eq!(
        segments(&again)["fwd-test"].id,
        fwd.id,
        "same forwarder segment id"
    );
    assert_eq!(
        (
            ifindex(&s.client_ns, "nsm-1"),
            ifindex(&s.endpoint_ns, &s.nse.ifname)
        ),
        (ci, ei)
    );
    s.assert_pristine(&plumbed, "a refresh");
    let reqs = s.nse.requests();
    assert_eq!(reqs.len(), 2, "the refresh went downstream");
    let refresh = reqs[1].0.connection.as_ref().unwrap();
    assert_eq!(
        kernel_name(refresh.mechanism.as_ref()).as_deref(),
        Some(s.nse.ifname.as_str()),
        "a refresh presents the endpoint's own mechanism"
    );
    let (echoed, _) = echo(
        &listener,
        &s.client_ns,
        &format!("{ENDPOINT_IP}:7000"),
        b"still",
    );
    assert_eq!(echoed, b"still");
    drop(listener);

    // Close: everything goes, in both namespaces, and the endpoint hears of it.
    s.client.close(again).await.unwrap();
    assert_eq!(s.nse.closes().len(), 1);
    assert_eq!(s.nse.closes()[0].id, fwd.id);
    s.assert_pristine(&pristine, "after Close");
    assert_eq!(s.hop.state()["connections"], serde_json::json!({}));
    // A second Close is a no-op.
    s.client.close(conn).await.unwrap();
    assert_eq!(s.nse.closes().len(), 1);
    // Nothing is held any more: namespace fds, netlink sockets, connections.
    eventually("the hop's fds to drop back", || {
        fd_count(s.hop.child.pid()) <= fds_before
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn client_side_rules_from_extra_context_redirect_in_the_client_netns() {
    if !require_root("client_side_rules_from_extra_context_redirect_in_the_client_netns") {
        return;
    }
    let spec = r#"{"version":1,"outboundPort":15001,"inboundPort":15006,"proxyUids":[1337]}"#;
    let s = setup(
        Behaviour {
            redirect: Some(spec.into()),
            mtu: 1400,
            ..Default::default()
        },
        &[],
        &[],
    )
    .await;
    let pristine = s.snapshots();
    let endpoint_pristine = nft_tables(&s.endpoint_ns);
    let conn = s
        .request(s.client.first())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", s.hop.log()));
    assert_eq!(
        link(&s.client_ns, "nsm-1").unwrap()["mtu"],
        1400,
        "context.MTU"
    );

    // One table of ours in the client namespace, none in the endpoint's.
    let tables = nft_tables(&s.client_ns);
    assert_eq!(tables.len(), 1, "{tables:?}");
    assert!(tables[0].starts_with("inet fp_"), "{tables:?}");
    assert_eq!(nft_tables(&s.endpoint_ns), endpoint_pristine);

    // A connection from the client to the endpoint's port 8080 (nothing
    // listens there) lands on the local proxy port instead.
    let proxy = listen_in(&s.client_ns, "0.0.0.0:15001");
    let (echoed, _) = echo(
        &proxy,
        &s.client_ns,
        &format!("{ENDPOINT_IP}:8080"),
        b"captured",
    );
    assert_eq!(echoed, b"captured");

    // A refresh leaves the rules as they are.
    let ruleset = s.client_ns.exec_ok(&["nft", "list", "ruleset"]);
    let conn = s.request(conn).await.unwrap();
    assert_eq!(s.client_ns.exec_ok(&["nft", "list", "ruleset"]), ruleset);

    s.client.close(conn).await.unwrap();
    drop(proxy);
    s.assert_pristine(&pristine, "after Close");
    assert_eq!(s.nse.closes().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_side_rules_with_the_iptables_backend() {
    if !require_root("client_side_rules_with_the_iptables_backend")
        || !nsm_tests::require_tool(
            "client_side_rules_with_the_iptables_backend",
            "iptables-restore",
        )
    {
        return;
    }
    let spec = r#"{"version":1,"outboundPort":15001,"inboundPort":15006}"#;
    let s = setup(
        Behaviour {
            redirect: Some(spec.into()),
            ..Default::default()
        },
        &["--backend", "iptables"],
        &[],
    )
    .await;
    let pristine = s.snapshots();
    let conn = s
        .request(s.client.first())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", s.hop.log()));
    let saved = s.client_ns.exec_ok(&["iptables-save", "-t", "nat"]);
    assert!(
        saved.contains(":FP_"),
        "our chains are FP_<hash>_*: {saved}"
    );
    assert_eq!(
        s.hop.state()["connections"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()["backend"],
        "iptables"
    );
    let proxy = listen_in(&s.client_ns, "0.0.0.0:15001");
    let (echoed, _) = echo(
        &proxy,
        &s.client_ns,
        &format!("{ENDPOINT_IP}:8080"),
        b"captured",
    );
    assert_eq!(echoed, b"captured");
    s.client.close(conn).await.unwrap();
    drop(proxy);
    s.assert_pristine(&pristine, "after Close");
    assert!(!s.client_ns.exec_ok(&["iptables-save"]).contains("FP_"));
}

/// Connections sharing a client namespace each get their own veth and
/// their own rules table; closing one leaves the other working.
#[tokio::test(flavor = "multi_thread")]
async fn connections_sharing_a_client_namespace_keep_their_own_rules() {
    if !require_root("connections_sharing_a_client_namespace_keep_their_own_rules") {
        return;
    }
    let spec = r#"{"version":1,"outboundPort":15001,"inboundPort":15006}"#;
    let s = setup(
        Behaviour {
            redirect: Some(spec.into()),
            ..Default::default()
        },
        &[],
        &[],
    )
    .await;
    let pristine = s.snapshots();
    let first = s.request(s.client.first()).await.unwrap();
    let other = TestClient::new(&s.hop.socket);
    let second = other
        .request(
            other.first(),
            "nsm-2",
            ClientNetns::Fd(&s.client_ns),
            TTL,
            WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", s.hop.log()));
    let tables = nft_tables(&s.client_ns);
    assert_eq!(tables.len(), 2, "one table per connection: {tables:?}");
    assert_ne!(tables[0], tables[1]);
    let b = addrs_for(1);
    assert_eq!(
        addrs(&s.client_ns, "nsm-2"),
        [format!("{}/32", b.client_ip)]
    );

    // A third connection asking for an interface name already plumbed here.
    let third = TestClient::new(&s.hop.socket);
    let e = third
        .request(
            third.first(),
            "nsm-2",
            ClientNetns::Fd(&s.client_ns),
            TTL,
            WAIT,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(
        e.message().contains("already plumbed for connection"),
        "{e:?}"
    );

    // Closing the first leaves the second's veth, table and traffic.
    s.client.close(first).await.unwrap();
    assert!(link(&s.client_ns, "nsm-1").is_none());
    let left = nft_tables(&s.client_ns);
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(tables.contains(&left[0]));
    // The second's rules still capture: its endpoint's port lands on the proxy.
    let proxy = listen_in(&s.client_ns, "0.0.0.0:15001");
    let (echoed, _) = echo(
        &proxy,
        &s.client_ns,
        &format!("{}:8080", b.endpoint_ip),
        b"second",
    );
    assert_eq!(echoed, b"second");
    drop(proxy);

    other.close(second).await.unwrap();
    s.assert_pristine(&pristine, "after both Closes");
}

/// A client that asks again from scratch with its stable id (a restarted
/// init container: only its own path segment) gets its connection back as
/// a refresh — same segment id here and at the endpoint, same interface —
/// also after the hop restarted; another caller asking for the same name
/// is still refused, and the same id from another namespace is another
/// connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_from_scratch_by_the_same_client_refreshes_its_connection() {
    if !require_root("a_request_from_scratch_by_the_same_client_refreshes_its_connection") {
        return;
    }
    let mut s = setup(Behaviour::default(), &[], &[]).await;
    let pristine = s.snapshots();
    let conn = s
        .request(s.client.first())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", s.hop.log()));
    let fwd_id = segments(&conn)["forwarder-plugin"].id.clone();
    let ci = ifindex(&s.client_ns, "nsm-1");
    let plumbed = s.snapshots();

    for round in ["again", "after a restart"] {
        let again = s
            .request(s.client.first())
            .await
            .unwrap_or_else(|e| panic!("{round}: {e:?}\n{}", s.hop.log()));
        assert_eq!(
            segments(&again)["forwarder-plugin"].id,
            fwd_id,
            "{round}: the same connection here"
        );
        assert_eq!(
            ifindex(&s.client_ns, "nsm-1"),
            ci,
            "{round}: the same interface"
        );
        s.assert_pristine(&plumbed, round);
        let (req, _) = s.nse.requests().pop().unwrap();
        let down = req.connection.unwrap();
        assert_eq!(
            down.id, fwd_id,
            "{round}: the endpoint sees our segment's id"
        );
        assert_eq!(
            segments(&down)["fake-nse"].id,
            format!("nse-{fwd_id}"),
            "{round}: and its own segment back, so it refreshes too"
        );
        assert_eq!(
            kernel_name(down.mechanism.as_ref()).as_deref(),
            Some(s.nse.ifname.as_str()),
            "{round}: a refresh presents the endpoint's own mechanism"
        );
        assert_eq!(s.hop.state()["connections"].as_object().unwrap().len(), 1);
        // The record survives a kill -9; the next round asks the new hop.
        s.hop.kill9();
        s.hop = Hop::start(s.dir.path(), &s.nse.url(), &[], &[]);
    }
    assert!(s.nse.closes().is_empty(), "nothing was closed downstream");

    // Another caller wanting nsm-1 in this namespace is refused.
    let other = TestClient::new(&s.hop.socket);
    let e = other
        .request(
            other.first(),
            "nsm-1",
            ClientNetns::Fd(&s.client_ns),
            TTL,
            WAIT,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    s.assert_pristine(&plumbed, "another caller refused");

    // The same id from another namespace is another connection.
    let elsewhere = TestNetns::new("hc2");
    let second = s
        .client
        .request(
            s.client.first(),
            "nsm-1",
            ClientNetns::Fd(&elsewhere),
            TTL,
            WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", s.hop.log()));
    assert_ne!(segments(&second)["forwarder-plugin"].id, fwd_id);
    assert!(link(&elsewhere, "nsm-1").is_some());
    s.client.close(second).await.unwrap();
    assert!(link(&elsewhere, "nsm-1").is_none());

    // A Close that lost the path too (only the caller's segment; the
    // mechanism names the namespace) closes the caller's connection.
    let mut lost = s.client.first();
    let mut m = mech::kernel([]);
    m.set_param(keys::NAME, "nsm-1");
    m.set_param(keys::INODE_URL, inode_of(&s.client_ns).to_string());
    lost.mechanism = Some(m);
    s.client.close(lost).await.unwrap();
    // (the refused caller's, the other namespace's, and this one)
    assert_eq!(s.nse.closes().len(), 3, "Closed downstream");
    assert_eq!(s.nse.closes()[2].id, fwd_id);
    s.assert_pristine(&pristine, "after Close");
    assert_eq!(s.hop.state()["connections"], serde_json::json!({}));
    drop(conn);
}

fn inode_of(ns: &TestNetns) -> InodeUrl {
    use std::os::unix::fs::MetadataExt;
    let st = std::fs::metadata(ns.path()).unwrap();
    InodeUrl::new(st.dev(), st.ino())
}

/// Requests at once, each from its own namespace, are plumbed side by side
/// (each its own veth, address and state file); callers racing for one
/// interface name in one namespace: exactly one gets it, the others are
/// refused (and Closed at the endpoint), and the winner's link is intact.
#[tokio::test(flavor = "multi_thread")]
async fn requests_at_once_plumb_side_by_side_and_race_for_a_name_safely() {
    if !require_root("requests_at_once_plumb_side_by_side_and_race_for_a_name_safely") {
        return;
    }
    const N: usize = 8;
    let s = setup(Behaviour::default(), &[], &[]).await;
    let pristine = s.snapshots();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..N {
        let (ns, client) = (TestNetns::new("hp"), TestClient::new(&s.hop.socket));
        set.spawn(async move {
            let res = client
                .request(client.first(), "nsm-1", ClientNetns::Fd(&ns), TTL, WAIT)
                .await;
            (ns, client, res)
        });
    }
    let mut up = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (ns, client, res) = joined.unwrap();
        let conn = res.unwrap_or_else(|e| panic!("{e:?}\n{}", s.hop.log()));
        let mine = addrs(&ns, "nsm-1");
        assert_eq!(mine.len(), 1, "{mine:?}");
        up.push((ns, client, conn, mine[0].clone()));
    }
    let distinct: std::collections::BTreeSet<_> = up.iter().map(|u| u.3.clone()).collect();
    assert_eq!(distinct.len(), N, "one address each: {distinct:?}");
    assert_eq!(s.hop.state()["connections"].as_object().unwrap().len(), N);

    let racers: Vec<TestClient> = (0..4).map(|_| TestClient::new(&s.hop.socket)).collect();
    let race = async |c: &TestClient| {
        c.request(c.first(), "nsm-9", ClientNetns::Fd(&s.client_ns), TTL, WAIT)
            .await
    };
    let (r0, r1, r2, r3) = tokio::join!(
        race(&racers[0]),
        race(&racers[1]),
        race(&racers[2]),
        race(&racers[3])
    );
    let mut won = Vec::new();
    for (client, res) in racers.iter().zip([r0, r1, r2, r3]) {
        match res {
            Ok(conn) => won.push((client, conn)),
            Err(e) => assert_eq!(e.code(), Code::AlreadyExists, "{e:?}"),
        }
    }
    assert_eq!(
        won.len(),
        1,
        "exactly one caller gets nsm-9\n{}",
        s.hop.log()
    );
    assert_eq!(
        s.nse.closes().len(),
        3,
        "the refused ones are Closed downstream"
    );
    let (winner, conn) = won.pop().unwrap();
    assert_eq!(
        addrs(&s.client_ns, "nsm-9").len(),
        1,
        "the winner's link is intact"
    );
    winner.close(conn).await.unwrap();

    for (ns, client, conn, _) in up {
        client.close(conn).await.unwrap();
        assert!(link(&ns, "nsm-1").is_none());
    }
    s.assert_pristine(&pristine, "after every Close");
    assert_eq!(s.hop.state()["connections"], serde_json::json!({}));
}

/// Each refusal: the right code, a message that says why, and both
/// namespaces exactly as before.
#[tokio::test(flavor = "multi_thread")]
async fn refusals_leave_both_namespaces_pristine() {
    if !require_root("refusals_leave_both_namespaces_pristine") {
        return;
    }
    let s = setup(Behaviour::default(), &[], &[]).await;
    let pristine = s.snapshots();

    // Another namespace, named by its inode but without its fd: refused,
    // that namespace untouched (the fd is the authority; nothing is ever
    // looked up by inode).
    let victim = TestNetns::new("hv");
    let victim_before = snapshot(&victim);
    let victim_url: InodeUrl = {
        use std::os::unix::fs::MetadataExt;
        let st = std::fs::metadata(victim.path()).unwrap();
        InodeUrl::new(st.dev(), st.ino())
    };
    let e = s
        .client
        .request(
            s.client.first(),
            "nsm-1",
            ClientNetns::InodeOnly(victim_url),
            TTL,
            WAIT,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message()
            .contains("no fd for the client's network namespace"),
        "{e:?}"
    );
    assert_same(
        &victim_before,
        &snapshot(&victim),
        "the named namespace changed",
    );
    assert!(
        s.nse.requests().is_empty(),
        "refused before going downstream"
    );

    // The forwarder's own namespace (the node's), fd and all: refused.
    let own = std::path::PathBuf::from("/proc/self/ns/net");
    let e = s
        .client
        .request(
            s.client.first(),
            "nsm-1",
            ClientNetns::FileFd(&own),
            TTL,
            WAIT,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("this forwarder's own"), "{e:?}");
    assert!(s.nse.requests().is_empty());

    // An fd that is not a network namespace.
    let file = s.dir.path().join("not-a-netns");
    std::fs::write(&file, b"x").unwrap();
    let e = s
        .client
        .request(
            s.client.first(),
            "nsm-1",
            ClientNetns::FileFd(&file),
            TTL,
            WAIT,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("not a network namespace"), "{e:?}");

    // A bad interface name.
    let e = s
        .client
        .request(
            s.client.first(),
            "much-too-long-name",
            ClientNetns::Fd(&s.client_ns),
            TTL,
            WAIT,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(s.nse.requests().is_empty());
    s.assert_pristine(&pristine, "client-side refusals");

    // An answer without addresses: refused, and Closed at the endpoint.
    s.nse.set(|b| b.no_addresses = true);
    let e = s.request(s.client.first()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("src_ip_addrs"), "{e:?}");
    assert_eq!(
        s.nse.closes().len(),
        1,
        "the accepted connection is Closed downstream"
    );
    s.assert_pristine(&pristine, "an answer without addresses");
    s.nse.set(|b| b.no_addresses = false);

    // A redirect spec that fails validation.
    s.nse
        .set(|b| b.redirect = Some(r#"{"version":1,"outboundPort":15006}"#.into()));
    let e = s.request(s.client.first()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("mesh-proxy.v1/client-redirect"),
        "{e:?}"
    );
    assert!(e.message().contains("outboundPort"), "{e:?}");
    assert_eq!(s.nse.closes().len(), 2);
    s.assert_pristine(&pristine, "a bad redirect spec");
    s.nse.set(|b| b.redirect = None);

    // An endpoint that hands over the forwarder's own namespace, or the
    // client's: refused, and Closed at the endpoint.
    for (file, code, why) in [
        (
            std::path::PathBuf::from("/proc/self/ns/net"),
            Code::PermissionDenied,
            "this forwarder's own",
        ),
        (
            std::path::PathBuf::from(s.client_ns.path()),
            Code::FailedPrecondition,
            "are the same",
        ),
    ] {
        s.nse.set(|b| b.netns_file = Some(file.clone()));
        let e = s.request(s.client.first()).await.unwrap_err();
        assert_eq!(e.code(), code, "{file:?}: {e:?}");
        assert!(e.message().contains(why), "{e:?}");
        s.assert_pristine(&pristine, "an endpoint naming a namespace not its own");
    }
    assert_eq!(s.nse.closes().len(), 4);
    s.nse.set(|b| b.netns_file = None);

    // The interface name is taken in the client namespace.
    s.client_ns.exec_ok(&[
        "ip", "link", "add", "nsm-1", "type", "veth", "peer", "name", "other-1",
    ]);
    let taken = s.snapshots();
    let e = s.request(s.client.first()).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("nsm-1"), "{e:?}");
    assert_eq!(s.nse.closes().len(), 5);
    s.assert_pristine(&taken, "a name collision");
    s.client_ns.exec_ok(&["ip", "link", "del", "nsm-1"]);

    // Nothing was recorded for any of them.
    assert_eq!(s.hop.state()["connections"], serde_json::json!({}));
    // And the hop still works.
    let conn = s.request(s.client.first()).await.unwrap();
    s.client.close(conn).await.unwrap();
    s.assert_pristine(&pristine, "after a good Request and Close");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_next_hop_that_is_down_or_slow_is_reported_and_nothing_is_plumbed() {
    if !require_root("a_next_hop_that_is_down_or_slow_is_reported_and_nothing_is_plumbed") {
        return;
    }
    let s = setup(
        Behaviour {
            delay: Duration::from_secs(3),
            ..Default::default()
        },
        &[],
        &[("NSM_REQUEST_TIMEOUT", "1s")],
    )
    .await;
    let pristine = s.snapshots();
    let e = s.request(s.client.first()).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains(&s.nse.url()), "{e:?}");
    s.assert_pristine(&pristine, "a slow next hop");

    let down = TempDir::new();
    let hop = Hop::start(
        down.path(),
        &format!("unix://{}/nobody.sock", down.path().display()),
        &[],
        &[],
    );
    let client = TestClient::new(&hop.socket);
    let e = client
        .request(
            client.first(),
            "nsm-1",
            ClientNetns::Fd(&s.client_ns),
            TTL,
            WAIT,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("nobody.sock"), "{e:?}");
    s.assert_pristine(&pristine, "a next hop that is down");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_nobody_refreshes_expires() {
    if !require_root("a_connection_nobody_refreshes_expires") {
        return;
    }
    let s = setup(Behaviour::default(), &[], &[]).await;
    let pristine = s.snapshots();
    // Our token expires in 3s; the Request's timeout is 1s: the hop closes at ~2s.
    let conn = s
        .client
        .request(
            s.client.first(),
            "nsm-1",
            ClientNetns::Fd(&s.client_ns),
            Duration::from_secs(3),
            Duration::from_secs(1),
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", s.hop.log()));
    assert!(link(&s.client_ns, "nsm-1").is_some());
    eventually("the expired connection to be closed downstream", || {
        s.nse.closes().len() == 1
    });
    s.assert_pristine(&pristine, "after expiry");
    assert_eq!(s.nse.closes()[0].id, segments(&conn)["forwarder-plugin"].id);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_hop_adopts_what_it_plumbed_before() {
    if !require_root("a_restarted_hop_adopts_what_it_plumbed_before") {
        return;
    }
    let spec = r#"{"version":1,"outboundPort":15001,"inboundPort":15006}"#;
    let mut s = setup(
        Behaviour {
            redirect: Some(spec.into()),
            ..Default::default()
        },
        &[],
        &[],
    )
    .await;
    let pristine = s.snapshots();
    let conn = s.request(s.client.first()).await.unwrap();
    let plumbed = s.snapshots();
    let ci = ifindex(&s.client_ns, "nsm-1");

    // kill -9: the state directory is all that is left of the hop.
    s.hop.kill9();
    s.assert_pristine(&plumbed, "kill -9");
    s.hop = Hop::start(s.dir.path(), &s.nse.url(), &[], &[]);
    // A refresh after the restart adopts the connection: nothing changes.
    let conn = s
        .request(conn)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", s.hop.log()));
    assert_eq!(ifindex(&s.client_ns, "nsm-1"), ci);
    s.assert_pristine(&plumbed, "the adopting refresh");

    // SIGTERM: the dataplane stays too (NSM forwarders keep it across restarts).
    assert!(
        s.hop.child.terminate(WAIT).is_some_and(|st| st.success()),
        "{}",
        s.hop.log()
    );
    s.assert_pristine(&plumbed, "a plain stop (the dataplane stays)");
    s.hop = Hop::start(s.dir.path(), &s.nse.url(), &[], &[]);

    // A Close after the restarts still undoes everything (from the state directory).
    s.client.close(conn).await.unwrap();
    s.assert_pristine(&pristine, "Close after a restart");
    assert_eq!(s.nse.closes().len(), 1, "the endpoint got the Close");
    assert_eq!(s.hop.state()["connections"], serde_json::json!({}));
}

/// An endpoint that asks for capture by intent and returns NSM policy
/// routes: the Request it gets announces what the hop does and carries
/// nothing of the contract the client made up; in the client's namespace
/// the connection's slot gets its mark rules, ip rules and tables; what is
/// captured reaches the endpoint from the client's interface address; a
/// kill -9 and restart adopts it all from the state directory, and a Close
/// then removes exactly it.
#[tokio::test(flavor = "multi_thread")]
async fn capture_and_policy_routes_are_the_connections_and_go_with_it() {
    if !require_root("capture_and_policy_routes_are_the_connections_and_go_with_it") {
        return;
    }
    let policy = nsm_api::connectioncontext::PolicyRoute {
        proto: "17".into(),
        dst_port: "53".into(),
        routes: vec![nsm_api::connectioncontext::Route {
            prefix: FAR_NET.into(),
            next_hop: ENDPOINT_IP.into(),
        }],
        ..Default::default()
    };
    let mut s = setup(
        Behaviour {
            capture: Some(r#"{"version":1,"excludeCidrs":["198.19.0.0/16"]}"#.into()),
            policies: vec![policy],
            ..Default::default()
        },
        &[],
        &[],
    )
    .await;
    let pristine = s.snapshots();
    let mut first = s.client.first();
    let extra = &mut first.context.get_or_insert_default().extra_context;
    extra.insert(
        "mesh-proxy.v1/forwarder-features".into(),
        "client-made-up".into(),
    );
    extra.insert("mesh-proxy.v1/client-capture".into(), "{}".into());
    let conn = s
        .request(first)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", s.hop.log()));
    let (req, _) = s.nse.requests().pop().unwrap();
    let extra = &req.connection.unwrap().context.unwrap().extra_context;
    assert_eq!(
        extra
            .get("mesh-proxy.v1/forwarder-features")
            .map(String::as_str),
        Some("client-redirect,client-capture")
    );
    assert!(
        !extra.contains_key("mesh-proxy.v1/client-capture"),
        "{extra:?}"
    );

    // Slot 1: mark and table 0x6d700010, policy table 0x6d700011.
    let rules = s.client_ns.exec_ok(&["ip", "-4", "rule"]);
    assert!(
        rules.contains("32000:\tfrom all fwmark 0x6d700010 lookup 1836056592 proto 158"),
        "{rules}"
    );
    assert!(
        rules.contains("32000:\tfrom all ipproto udp dport 53 lookup 1836056593 proto 158"),
        "{rules}"
    );
    let table = s
        .client_ns
        .exec_ok(&["ip", "route", "show", "table", "1836056592"]);
    assert!(
        table.contains("default via 198.18.0.2 dev nsm-1"),
        "{table}"
    );
    let policy_table = s
        .client_ns
        .exec_ok(&["ip", "route", "show", "table", "1836056593"]);
    assert!(
        policy_table.contains("198.18.10.0/24 via 198.18.0.2 dev nsm-1"),
        "{policy_table}"
    );
    let ruleset = s.client_ns.exec_ok(&["nft", "list", "ruleset"]);
    assert!(
        ruleset.contains("ip daddr 198.19.0.0/16 return"),
        "{ruleset}"
    );
    assert!(ruleset.contains("masquerade"), "{ruleset}");
    assert_eq!(s.hop.state()["connections"].as_object().unwrap().len(), 1);

    // TCP the client starts to a captured address reaches the endpoint
    // from the client's address, though nothing else routes it there.
    s.endpoint_ns
        .exec_ok(&["ip", "addr", "add", "198.18.250.5/32", "dev", "lo"]);
    let far = listen_in(&s.endpoint_ns, "198.18.250.5:8080");
    let (_, peer) = echo(&far, &s.client_ns, "198.18.250.5:8080", b"captured");
    assert_eq!(
        peer.ip().to_string(),
        CLIENT_IP,
        "masqueraded to nsm-1's address"
    );
    drop(far);
    s.endpoint_ns
        .exec_ok(&["ip", "addr", "del", "198.18.250.5/32", "dev", "lo"]);
    let plumbed = s.snapshots();

    s.hop.kill9();
    s.hop = Hop::start(s.dir.path(), &s.nse.url(), &[], &[]);
    let conn = s
        .request(conn)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", s.hop.log()));
    s.assert_pristine(&plumbed, "the adopting refresh keeps the slot");
    s.hop.kill9();
    s.hop = Hop::start(s.dir.path(), &s.nse.url(), &[], &[]);
    s.client.close(conn).await.unwrap();
    s.assert_pristine(&pristine, "Close after a restart");
}

/// After a restart a recorded namespace is found by inode, and taken for
/// the recorded one only if it provably is (its cookie): the kernel hands a
/// deleted namespace's inode number to the next new one, which is someone
/// else's and is left alone — here a namespace with a decoy `nsm-1`.
#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_that_reuses_a_recorded_inode_is_not_taken_for_it() {
    if !require_root("a_namespace_that_reuses_a_recorded_inode_is_not_taken_for_it") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let mut s = setup(Behaviour::default(), &[], &[]).await;
    let endpoint_pristine = snapshot(&s.endpoint_ns);
    let conn = s.request(s.client.first()).await.unwrap();
    s.hop.kill9();
    let inode = std::fs::metadata(s.client_ns.path()).unwrap().ino();
    // The client goes (and its veth with it) while no hop runs.
    drop(std::mem::replace(&mut s.client_ns, TestNetns::new("hc")));
    // The kernel frees a namespace (and its inode) asynchronously, after
    // every namespace destroyed before it: under load that takes a while.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut tries = Vec::new();
    let decoy = loop {
        let ns = TestNetns::new("hd");
        if std::fs::metadata(ns.path()).unwrap().ino() == inode {
            break ns;
        }
        tries.push(ns);
        assert!(
            Instant::now() < deadline,
            "no new namespace got the freed inode {inode} in 90s ({} tried)",
            tries.len()
        );
        if tries.len() > 8 {
            // Let the freed numbers come back in order.
            tries.clear();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    drop(tries);
    decoy.exec_ok(&[
        "ip",
        "link",
        "add",
        "nsm-1",
        "type",
        "veth",
        "peer",
        "name",
        "decoy-peer",
    ]);
    let decoy_before = snapshot(&decoy);

    s.hop = Hop::start(s.dir.path(), &s.nse.url(), &[], &[]);
    s.client.close(conn).await.unwrap();
    assert_same(
        &decoy_before,
        &snapshot(&decoy),
        "the decoy namespace was touched",
    );
    assert_eq!(s.hop.state()["connections"], serde_json::json!({}));
    assert_eq!(s.nse.closes().len(), 1, "the endpoint got the Close");
    assert_same(
        &endpoint_pristine,
        &snapshot(&s.endpoint_ns),
        "the endpoint's side went with the client's namespace",
    );
}

/// A Close that cannot undo everything (here: someone replaced the
/// client's `nsm-1` with a link of their own, which the hop leaves alone)
/// reports it, keeps the record marked for undoing, and the next start of
/// the hop finishes the job once it can.
#[tokio::test(flavor = "multi_thread")]
async fn a_teardown_that_fails_is_kept_and_finished_by_the_next_start() {
    if !require_root("a_teardown_that_fails_is_kept_and_finished_by_the_next_start") {
        return;
    }
    let mut s = setup(Behaviour::default(), &[], &[]).await;
    let pristine = s.snapshots();
    let conn = s.request(s.client.first()).await.unwrap();
    s.client_ns.exec_ok(&["ip", "link", "del", "nsm-1"]);
    s.client_ns.exec_ok(&[
        "ip", "link", "add", "nsm-1", "type", "veth", "peer", "name", "impostor",
    ]);
    let e = s.client.close(conn).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("nsm-1"), "{e:?}");
    let state = s.hop.state();
    let recs = state["connections"].as_object().unwrap();
    assert_eq!(recs.len(), 1, "the record stays: {state}");
    let rec = recs.values().next().unwrap();
    assert_eq!(rec["session"]["closing"], true, "{rec}");
    assert!(
        link(&s.client_ns, "nsm-1").is_some(),
        "the impostor is left alone"
    );

    assert!(s.hop.child.terminate(WAIT).is_some_and(|st| st.success()));
    s.client_ns.exec_ok(&["ip", "link", "del", "nsm-1"]);
    s.hop = Hop::start(s.dir.path(), &s.nse.url(), &[], &[]);
    eventually("the next start finishes the Close", || {
        s.hop.state()["connections"] == serde_json::json!({})
    });
    s.assert_pristine(&pristine, "after the next start");
}

/// A connection file the hop cannot read (garbage, a newer format) does
/// not keep it from starting: it is set aside beside the others, kept as
/// it was, and the hop serves.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_state_file_does_not_stop_the_hop() {
    if !require_root("an_unreadable_state_file_does_not_stop_the_hop") {
        return;
    }
    let mut s = setup(Behaviour::default(), &[], &[]).await;
    assert!(s.hop.child.terminate(WAIT).is_some_and(|st| st.success()));
    let conns = s.dir.path().join("state/connections");
    std::fs::write(conns.join("0123456789abcdef.json"), "{not json").unwrap();
    s.hop = Hop::start(s.dir.path(), &s.nse.url(), &[], &[]);
    let conn = s
        .request(s.client.first())
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", s.hop.log()));
    let names: Vec<String> = std::fs::read_dir(&conns)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let aside: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("0123456789abcdef.json.unreadable-"))
        .collect();
    assert_eq!(aside.len(), 1, "{names:?}");
    assert_eq!(
        std::fs::read_to_string(conns.join(aside[0])).unwrap(),
        "{not json"
    );
    assert!(s.hop.log().contains("set aside"), "{}", s.hop.log());
    s.client.close(conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn cleanup_on_exit_undoes_every_connection() {
    if !require_root("cleanup_on_exit_undoes_every_connection") {
        return;
    }
    let mut s = setup(Behaviour::default(), &["--cleanup-on-exit"], &[]).await;
    let pristine = s.snapshots();
    s.request(s.client.first()).await.unwrap();
    assert!(link(&s.client_ns, "nsm-1").is_some());
    assert!(
        s.hop.child.terminate(WAIT).is_some_and(|st| st.success()),
        "{}",
        s.hop.log()
    );
    s.assert_pristine(&pristine, "after exit with --cleanup-on-exit");
    assert_eq!(s.nse.closes().len(), 1);
}

#[test]
fn invalid_configuration_is_one_line_and_exit_64() {
    for (args, env, want) in [
        (
            &["serve", "--insecure"][..],
            &[][..],
            "NSM_CONNECT_TO (--connect-to): is required",
        ),
        (
            &["serve", "--next-hop", "unix:///x.sock"],
            &[],
            "no identity: set SPIFFE_ENDPOINT_SOCKET",
        ),
        (
            &["serve", "--insecure", "--next-hop", "unix:///x.sock"],
            &[("NSM_CONNECT_TO", "unix:///y.sock")],
            "NSM_NEXT_HOP is its older name",
        ),
        (
            &["serve", "--insecure", "--next-hop", "tcp://1.2.3.4:5"],
            &[],
            "NSM_NEXT_HOP",
        ),
        (
            &["serve", "--insecure", "--next-hop", "unix:///x.sock"],
            &[("NSM_DIAL_TIMEOUT", "soon")],
            "NSM_DIAL_TIMEOUT",
        ),
    ] {
        let out = std::process::Command::new(nsm_tests::process::bin("forwarder-plugin"))
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
