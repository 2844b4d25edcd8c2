//! Where connections land once redirect rules are applied, for every backend
//! (nft, iptables-nft, iptables-legacy), in a pod namespace joined by veth
//! to a peer: identity servers answer with their label, the address the
//! connection arrived at and the `SO_ORIGINAL_DST` they saw.

#[macro_use]
mod redirect_common;

use nsm_tests::topology::{Client, FAR_V4, FAR_V6, PEER_V4, PEER_V6, POD_V4, POD_V6, v4, v6};
use redirect_common::{Kind, Lab, app, backend, plan};

fn root(name: &str) -> bool {
    nsm_tests::require_root(name)
}

/// Outbound TCP to the peer lands on the proxy's outbound port with the
/// original destination intact; before the rules it reached the peer.
fn outbound_lands_on_outbound_port(kind: Kind) {
    if !root("outbound_lands_on_outbound_port") {
        return;
    }
    let lab = Lab::new();
    let dst = v4(PEER_V4, 8080);
    assert_eq!(
        lab.out(app(), dst).label,
        "peer",
        "topology works before rules"
    );
    backend(kind).apply(lab.pod(), &plan("{}")).unwrap();
    let r = lab.out(app(), dst);
    assert_eq!(r.label, "pod-out");
    assert_eq!(r.local.port(), 15001);
    assert_eq!(r.orig, Some(dst));
    // Any outbound address is captured by default.
    let far = v4(FAR_V4[0], 9090);
    assert_eq!(lab.out(app(), far).orig, Some(far));
}

/// The proxy's own connections (by uid, by gid) go straight out: no loop.
fn proxy_identity_goes_direct(kind: Kind) {
    if !root("proxy_identity_goes_direct") {
        return;
    }
    let lab = Lab::new();
    backend(kind)
        .apply(
            lab.pod(),
            &plan(r#"{"proxyUids": [1337, 1400], "proxyGids": [1500]}"#),
        )
        .unwrap();
    let dst = v4(PEER_V4, 8080);
    for who in [Client::uid(1337), Client::uid(1400), Client::gid(1500)] {
        let r = lab.out(who, dst);
        assert_eq!(r.label, "peer", "{who:?}");
        assert_eq!(r.from.ip(), POD_V4);
    }
    assert_eq!(lab.out(Client::uid(1338), dst).label, "pod-out");
    assert_eq!(lab.out(Client::gid(1337), dst).label, "pod-out");
}

/// Ambient style: a socket carrying the bypass mark goes direct, whatever
/// its uid; other marks and uid 1337 are captured.
fn bypass_mark_goes_direct(kind: Kind) {
    if !root("bypass_mark_goes_direct") {
        return;
    }
    let lab = Lab::new();
    backend(kind)
        .apply(
            lab.pod(),
            &plan(r#"{"proxyUids": [], "proxyGids": [], "bypassMark": "0x539/0xfff"}"#),
        )
        .unwrap();
    let dst = v4(PEER_V4, 8080);
    assert_eq!(lab.out(Client::mark(0x539), dst).label, "peer");
    // Only the masked bits count.
    assert_eq!(lab.out(Client::mark(0x7539), dst).label, "peer");
    assert_eq!(lab.out(Client::mark(0x53a), dst).label, "pod-out");
    assert_eq!(lab.out(Client::uid(1337), dst).label, "pod-out");
}

/// Excluded CIDRs and ports reach the peer directly; everything else is
/// captured.
fn excluded_cidrs_and_ports_go_direct(kind: Kind) {
    if !root("excluded_cidrs_and_ports_go_direct") {
        return;
    }
    let lab = Lab::new();
    backend(kind)
        .apply(
            lab.pod(),
            &plan(r#"{"excludeOutboundCidrs": ["198.19.1.0/24"], "excludeOutboundPorts": [9090]}"#),
        )
        .unwrap();
    assert_eq!(lab.out(app(), v4(FAR_V4[0], 8080)).label, "peer");
    assert_eq!(lab.out(app(), v4(PEER_V4, 9090)).label, "peer");
    let captured = v4(FAR_V4[1], 8080);
    let r = lab.out(app(), captured);
    assert_eq!((r.label.as_str(), r.orig), ("pod-out", Some(captured)));
}

/// Include lists: only the listed CIDR and the listed port are captured.
fn include_lists_capture_only_what_they_list(kind: Kind) {
    if !root("include_lists_capture_only_what_they_list") {
        return;
    }
    let lab = Lab::new();
    backend(kind)
        .apply(
            lab.pod(),
            &plan(r#"{"includeOutboundCidrs": ["198.19.2.0/24"], "includeOutboundPorts": [9090]}"#),
        )
        .unwrap();
    assert_eq!(lab.out(app(), v4(FAR_V4[1], 8080)).label, "pod-out");
    assert_eq!(lab.out(app(), v4(FAR_V4[0], 8080)).label, "peer");
    assert_eq!(lab.out(app(), v4(PEER_V4, 8080)).label, "peer");
    let r = lab.out(app(), v4(PEER_V4, 9090));
    assert_eq!(
        (r.label.as_str(), r.orig),
        ("pod-out", Some(v4(PEER_V4, 9090)))
    );
}

/// Inbound to an application port lands on the inbound port with the
/// original destination; excluded ports reach the app. A narrower include
/// list applied on top replaces the rules.
fn inbound_lands_on_inbound_port(kind: Kind) {
    if !root("inbound_lands_on_inbound_port") {
        return;
    }
    let lab = Lab::new();
    let b = backend(kind);
    b.apply(lab.pod(), &plan("{}")).unwrap();
    let r = lab.inbound(v4(POD_V4, 8080));
    assert_eq!(r.label, "pod-in");
    assert_eq!(r.orig, Some(v4(POD_V4, 8080)));
    assert_eq!(r.from.ip(), PEER_V4);
    assert_eq!(lab.inbound(v4(POD_V4, 15021)).label, "pod-app");

    b.apply(lab.pod(), &plan(r#"{"includeInboundPorts": [8080]}"#))
        .unwrap();
    assert_eq!(lab.inbound(v4(POD_V4, 8080)).label, "pod-in");
    assert_eq!(lab.inbound(v4(POD_V4, 8081)).label, "pod-app");

    b.apply(lab.pod(), &plan(r#"{"includeInboundPorts": []}"#))
        .unwrap();
    assert_eq!(lab.inbound(v4(POD_V4, 8080)).label, "pod-app");
}

/// Loopback is never redirected; the app reaching its own pod address goes
/// straight to the app, while the proxy doing so is sent to the inbound
/// proxy (istio's hairpin).
fn loopback_is_not_redirected(kind: Kind) {
    if !root("loopback_is_not_redirected") {
        return;
    }
    let lab = Lab::new();
    backend(kind).apply(lab.pod(), &plan("{}")).unwrap();
    let local = v4("127.0.0.1".parse().unwrap(), 8080);
    assert_eq!(lab.out(app(), local).label, "pod-app");
    assert_eq!(lab.out(Client::uid(1337), local).label, "pod-app");
    assert_eq!(lab.out(app(), v4(POD_V4, 8080)).label, "pod-app");
    let r = lab.out(Client::uid(1337), v4(POD_V4, 8080));
    assert_eq!(r.label, "pod-in");
    assert_eq!(r.orig, Some(v4(POD_V4, 8080)));
}

/// DNS to port 53 (UDP and TCP) reaches the DNS port when captured; the
/// proxy's own lookups go upstream; without capture nothing changes.
fn dns_is_captured(kind: Kind) {
    if !root("dns_is_captured") {
        return;
    }
    let lab = Lab::new();
    let b = backend(kind);
    let dns = v4(PEER_V4, 53);
    b.apply(lab.pod(), &plan("{}")).unwrap();
    assert_eq!(lab.udp_out(app(), dns).label, "peer-dns");

    b.apply(lab.pod(), &plan(r#"{"captureDns": true}"#))
        .unwrap();
    // (The client's socket is connected to the resolver: it accepts the
    // answer only because the NAT is undone on the way back.)
    let r = lab.udp_out(app(), dns);
    assert_eq!((r.label.as_str(), r.local.port()), ("pod-dns", 15053));
    let tcp = lab.out(app(), dns);
    assert_eq!((tcp.label.as_str(), tcp.orig), ("pod-dns", Some(dns)));
    assert_eq!(lab.udp_out(Client::uid(1337), dns).label, "peer-dns");
    assert_eq!(lab.out(Client::uid(1337), dns).label, "peer-dns");

    // istio#33469: the proxy's upstream query may reuse the app's 4-tuple.
    // Without the conntrack zones it would join the app's NATed flow and
    // loop back into the DNS proxy; with them it reaches the resolver.
    let app_port = Client {
        src_port: Some(40053),
        ..app()
    };
    let proxy_port = Client {
        src_port: Some(40053),
        ..Client::uid(1337)
    };
    assert_eq!(lab.udp_out(app_port, dns).label, "pod-dns");
    assert_eq!(lab.udp_out(proxy_port, dns).label, "peer-dns");
    assert_eq!(lab.udp_out(app_port, dns).label, "pod-dns");
}

/// IPv6 behaves the same when enabled, and is left alone when not.
fn ipv6_is_captured_when_enabled(kind: Kind) {
    if !root("ipv6_is_captured_when_enabled") {
        return;
    }
    let lab = Lab::new();
    let b = backend(kind);
    let dst = v6(PEER_V6, 8080);
    b.apply(lab.pod(), &plan("{}")).unwrap();
    assert_eq!(
        lab.out(app(), dst).label,
        "peer",
        "v4-only spec leaves IPv6 alone"
    );

    b.apply(
        lab.pod(),
        &plan(r#"{"ipv6": true, "captureDns": true, "excludeOutboundCidrs": ["fd00:1::/64"]}"#),
    )
    .unwrap();
    let r = lab.out(app(), dst);
    assert_eq!((r.label.as_str(), r.orig), ("pod-out", Some(dst)));
    assert_eq!(lab.out(Client::uid(1337), dst).label, "peer");
    assert_eq!(lab.out(app(), v6(FAR_V6[0], 8080)).label, "peer");
    assert_eq!(lab.out(app(), v6(FAR_V6[1], 8080)).label, "pod-out");
    assert_eq!(
        lab.out(app(), v6("::1".parse().unwrap(), 8080)).label,
        "pod-app"
    );
    let r = lab.inbound(v6(POD_V6, 8080));
    assert_eq!(
        (r.label.as_str(), r.orig),
        ("pod-in", Some(v6(POD_V6, 8080)))
    );
    assert_eq!(lab.udp_out(app(), v6(PEER_V6, 53)).label, "pod-dns");
    // IPv4 still works alongside.
    assert_eq!(lab.out(app(), v4(PEER_V4, 8080)).label, "pod-out");
}

/// Traffic through an excluded interface is never captured, either way.
fn excluded_interface_is_left_alone(kind: Kind) {
    if !root("excluded_interface_is_left_alone") {
        return;
    }
    let lab = Lab::new();
    let spec = format!(r#"{{"excludeInterfaces": ["{}"]}}"#, lab.topo.pod_if);
    backend(kind).apply(lab.pod(), &plan(&spec)).unwrap();
    assert_eq!(lab.out(app(), v4(PEER_V4, 8080)).label, "peer");
    assert_eq!(lab.inbound(v4(POD_V4, 8080)).label, "pod-app");
}

/// `includeInterfaces`: inbound capture only for traffic arriving on the
/// listed interfaces — to any destination address and port, even one the
/// pod does not own (an endpoint proxying what clients route to it) — while
/// another interface of the same pod is left alone; and no outbound capture.
fn include_interfaces_capture_only_there(kind: Kind) {
    if !root("include_interfaces_capture_only_there") {
        return;
    }
    let lab = Lab::new();
    // A second link between pod and peer: pod 198.18.1.2 / fd00:9::2.
    let (pod2, peer2) = (nsm_tests::unique("vr"), nsm_tests::unique("vs"));
    let (pod, peer) = (&lab.topo.pod, &lab.topo.peer);
    pod.exec_ok(&[
        "ip",
        "link",
        "add",
        &pod2,
        "type",
        "veth",
        "peer",
        "name",
        &peer2,
        "netns",
        peer.name(),
    ]);
    pod.exec_ok(&["ip", "addr", "add", "198.18.1.2/24", "dev", &pod2]);
    pod.exec_ok(&["ip", "addr", "add", "fd00:9::2/64", "dev", &pod2, "nodad"]);
    pod.exec_ok(&["ip", "link", "set", &pod2, "up"]);
    peer.exec_ok(&["ip", "addr", "add", "198.18.1.1/24", "dev", &peer2]);
    peer.exec_ok(&["ip", "addr", "add", "fd00:9::1/64", "dev", &peer2, "nodad"]);
    peer.exec_ok(&["ip", "link", "set", &peer2, "up"]);
    // Destinations the pod does not own, routed to it over each link.
    peer.exec_ok(&["ip", "route", "add", "198.19.99.0/24", "via", "198.18.0.2"]);
    peer.exec_ok(&["ip", "route", "add", "198.19.98.0/24", "via", "198.18.1.2"]);
    let pod2_v4 = v4("198.18.1.2".parse().unwrap(), 8080);
    let pod2_v6 = v6("fd00:9::2".parse().unwrap(), 8080);

    let b = backend(kind);
    let spec = |nic: &str| {
        plan(&format!(
            r#"{{"includeInterfaces": ["{nic}"], "excludeInboundPorts": [],
                "includeOutboundCidrs": [], "excludeOutboundPorts": [], "ipv6": true}}"#
        ))
    };
    b.apply(lab.pod(), &spec(&lab.topo.pod_if)).unwrap();
    let listed = [
        v4(POD_V4, 8080),
        v4(POD_V4, 15021),
        v4("198.19.99.7".parse().unwrap(), 4242),
        v6(POD_V6, 8080),
    ];
    for dst in listed {
        let r = lab.inbound(dst);
        assert_eq!((r.label.as_str(), r.orig), ("pod-in", Some(dst)), "{dst}");
        assert_eq!(r.local.port(), 15006, "{dst}");
    }
    // The unlisted interface: straight to the app.
    assert_eq!(lab.inbound(pod2_v4).label, "pod-app");
    assert_eq!(lab.inbound(pod2_v6).label, "pod-app");
    // Nothing outbound is captured, the app's and the proxy's alike.
    assert_eq!(lab.out(app(), v4(PEER_V4, 8080)).label, "peer");
    assert_eq!(
        lab.out(Client::uid(1337), v4(POD_V4, 8080)).label,
        "pod-app"
    );

    // The other interface instead: the roles swap.
    b.apply(lab.pod(), &spec(&pod2)).unwrap();
    assert_eq!(lab.inbound(v4(POD_V4, 8080)).label, "pod-app");
    for dst in [pod2_v4, pod2_v6, v4("198.19.98.7".parse().unwrap(), 4242)] {
        let r = lab.inbound(dst);
        assert_eq!((r.label.as_str(), r.orig), ("pod-in", Some(dst)), "{dst}");
    }
    b.cleanup(lab.pod()).unwrap();
    assert_eq!(lab.inbound(pod2_v4).label, "pod-app");
}

per_backend!(
    include_interfaces_capture_only_there,
    outbound_lands_on_outbound_port,
    proxy_identity_goes_direct,
    bypass_mark_goes_direct,
    excluded_cidrs_and_ports_go_direct,
    include_lists_capture_only_what_they_list,
    inbound_lands_on_inbound_port,
    loopback_is_not_redirected,
    dns_is_captured,
    ipv6_is_captured_when_enabled,
    excluded_interface_is_left_alone,
);
