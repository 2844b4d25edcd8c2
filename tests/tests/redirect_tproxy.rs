//! TPROXY mode: inbound connections are delivered to a transparent
//! (`IP_TRANSPARENT`) listener on the inbound port, which sees the original
//! destination as its local address and the real client as the peer; the
//! policy routing it needs comes and goes with the rules.

#[macro_use]
mod redirect_common;

use nsm_tests::topology::{IdentityServer, PEER_V4, PEER_V6, POD_V4, POD_V6, any, v4, v6};
use redirect_common::{Kind, app, backend, plan, state};

fn tproxy_delivers_to_a_transparent_listener(kind: Kind) {
    if !nsm_tests::require_root("tproxy_delivers_to_a_transparent_listener") {
        return;
    }
    let lab = redirect_common::Lab::new();
    // The Lab's plain :15006 listeners are replaced by transparent ones on a
    // port of their own.
    let _t4 = IdentityServer::tcp(lab.pod(), any(false, 15106), "pod-tproxy", true);
    let _t6 = IdentityServer::tcp(lab.pod(), any(true, 15106), "pod-tproxy", true);
    let b = backend(kind);
    let p = plan(r#"{"mode": "tproxy", "inboundPort": 15106, "ipv6": true}"#);
    b.apply(lab.pod(), &p).unwrap();

    for (dst, peer) in [
        (v4(POD_V4, 8080), PEER_V4.into()),
        (v6(POD_V6, 8080), std::net::IpAddr::from(PEER_V6)),
    ] {
        let r = lab.inbound(dst);
        assert_eq!(r.label, "pod-tproxy", "{dst}");
        // No NAT: the listener's socket carries the original addresses
        // (and conntrack's original destination is that same address).
        assert_eq!(r.local, dst);
        assert_eq!(r.from.ip(), peer);
        assert_eq!(r.orig, Some(dst));
    }
    // Excluded inbound ports still reach the app; outbound is still NAT.
    assert_eq!(lab.inbound(v4(POD_V4, 15021)).label, "pod-app");
    assert_eq!(lab.out(app(), v4(PEER_V4, 8080)).label, "pod-out");

    let s = state(&lab.topo.pod);
    // One ip rule per family (IPv4 and IPv6 are both captured here).
    assert_eq!(
        s.ip_rules
            .matches("fwmark 0x539 lookup 133 proto 157")
            .count(),
        2,
        "{}",
        s.ip_rules
    );
    assert!(
        s.routes
            .contains("local default dev lo table 133 proto 157"),
        "{}",
        s.routes
    );
    assert!(b.verify(lab.pod(), &p).unwrap().is_empty());

    // Without the policy route the transparent delivery stops working, and
    // verify says why.
    lab.topo
        .pod
        .exec_ok(&["ip", "-4", "rule", "del", "fwmark", "1337", "lookup", "133"]);
    let drift = b.verify(lab.pod(), &p).unwrap();
    assert!(
        drift
            .to_string()
            .contains("missing ip rule fwmark 0x539 lookup 133"),
        "{drift}"
    );
    forwarder_plugin::rules::reconcile(b.as_ref(), lab.pod(), &p).unwrap();
    assert!(b.verify(lab.pod(), &p).unwrap().is_empty());
    assert_eq!(lab.inbound(v4(POD_V4, 8080)).label, "pod-tproxy");

    b.cleanup(lab.pod()).unwrap();
    let s = state(&lab.topo.pod);
    assert!(!s.mentions_ours(), "cleanup left something of ours");
    assert_eq!(lab.inbound(v4(POD_V4, 8080)).label, "pod-app");
}

/// Switching a namespace from TPROXY to REDIRECT leaves no policy routing
/// behind once reconciled, and inbound goes through NAT again.
fn tproxy_to_redirect_switch(kind: Kind) {
    if !nsm_tests::require_root("tproxy_to_redirect_switch") {
        return;
    }
    let lab = redirect_common::Lab::new();
    let b = backend(kind);
    b.apply(lab.pod(), &plan(r#"{"mode": "tproxy"}"#)).unwrap();
    let redirect = plan("{}");
    b.apply(lab.pod(), &redirect).unwrap();
    let drift = b.verify(lab.pod(), &redirect).unwrap();
    assert!(drift.to_string().contains("extra ip rule"), "{drift}");
    forwarder_plugin::rules::reconcile(b.as_ref(), lab.pod(), &redirect).unwrap();
    assert!(b.verify(lab.pod(), &redirect).unwrap().is_empty());
    let s = state(&lab.topo.pod);
    assert!(!s.ip_rules.contains("lookup 133"), "{}", s.ip_rules);
    let r = lab.inbound(v4(POD_V4, 8080));
    assert_eq!(
        (r.label.as_str(), r.orig),
        ("pod-in", Some(v4(POD_V4, 8080)))
    );
}

per_backend!(
    tproxy_delivers_to_a_transparent_listener,
    tproxy_to_redirect_switch
);
