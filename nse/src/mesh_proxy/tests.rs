//! The function without a kernel: what it returns for each placement and
//! label, and what it refuses. (Rules in a real netns: tests/tests/nse_function.rs.)

use std::collections::HashMap;

use nsm_api::connection::Mechanism;
use nsm_api::connectioncontext::{ConnectionContext, IpContext, Route};
use nsm_api::contract::redirect::Port;

use super::*;

/// A function that never touches a kernel: no CAP_NET_ADMIN, so placement
/// proxy is refused before any rule is written.
fn function(yaml: &str) -> MeshProxy {
    let config = FunctionConfig::parse(yaml).unwrap();
    MeshProxy {
        own: Arc::new(own_table(&config, Arc::default()).unwrap()),
        config,
        net_admin: false,
        proxy: None,
    }
}

/// A connection as the function sees it behind our forwarder (which
/// announces its features): mechanism and IPAM done.
fn conn(labels: &[(&str, &str)]) -> Connection {
    let mut c = stock_conn(labels);
    forwarder_plugin::hop::announce_features(&mut c);
    c
}

/// The same behind a forwarder that announces nothing (NSM's own).
fn stock_conn(labels: &[(&str, &str)]) -> Connection {
    let mut m = Mechanism {
        cls: "LOCAL".into(),
        r#type: "KERNEL".into(),
        ..Default::default()
    };
    m.set_param("name", "mesh-proxy-Ab3x");
    Connection {
        id: "c1".into(),
        network_service: "mesh-proxy".into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<HashMap<_, _>>(),
        mechanism: Some(m),
        context: Some(ConnectionContext {
            ip_context: Some(IpContext {
                src_ip_addrs: vec!["198.18.0.1/32".into()],
                dst_ip_addrs: vec!["198.18.0.0/32".into()],
                src_routes: vec![Route {
                    prefix: "198.18.0.0/32".into(),
                    next_hop: String::new(),
                }],
                dst_routes: vec![Route {
                    prefix: "198.18.0.1/32".into(),
                    next_hop: String::new(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn extra(c: &Connection) -> Option<&String> {
    c.context.as_ref()?.extra_context.get(CLIENT_REDIRECT_KEY)
}

fn src_routes(c: &Connection) -> Vec<(String, String)> {
    c.context
        .as_ref()
        .unwrap()
        .ip_context
        .as_ref()
        .unwrap()
        .src_routes
        .iter()
        .map(|r| (r.prefix.clone(), r.next_hop.clone()))
        .collect()
}

#[tokio::test]
async fn sidecar_returns_the_clients_spec_and_only_the_p2p_route() {
    let f = function("placement: sidecar\nsidecar: {excludeOutboundPorts: [15020]}\n");
    let mut c = conn(&[("podName", "x")]);
    f.apply(&mut c).await.unwrap();
    let spec = RedirectSpec::from_json(extra(&c).expect("the client's spec")).unwrap();
    assert_eq!(spec.exclude_outbound_ports, [Port(15020)]);
    assert_eq!(spec.outbound_port, Port(15001));
    Plan::new(&spec).unwrap();
    assert_eq!(
        src_routes(&c),
        [("198.18.0.0/32".to_owned(), String::new())]
    );
    assert!(
        !c.context
            .as_ref()
            .unwrap()
            .extra_context
            .contains_key(FORWARDER_FEATURES_KEY),
        "the forwarder's announcement is not echoed"
    );
    // A refresh (which the forwarder announces again) gives the same answer.
    let before = c.clone();
    forwarder_plugin::hop::announce_features(&mut c);
    f.apply(&mut c).await.unwrap();
    assert_eq!(c, before);
    assert!(f.captured_interfaces().is_empty());
}

#[tokio::test]
async fn sidecar_behind_a_forwarder_that_cannot_apply_it_is_refused() {
    let f = function("placement: sidecar\n");
    let mut c = stock_conn(&[]);
    let before = c.clone();
    let e = f.apply(&mut c).await.unwrap_err();
    assert!(matches!(e, FunctionError::Precondition { .. }), "{e}");
    assert!(e.to_string().contains("use placement proxy"), "{e}");
    assert_eq!(c, before);
}

#[test]
fn the_capture_method_follows_the_forwarder() {
    for (yaml, ours, want) in [
        ("", true, Ok(Method::Rules)),
        ("", false, Ok(Method::Policies)),
        ("capture: {method: policies}", true, Ok(Method::Policies)),
        ("capture: {method: rules}", true, Ok(Method::Rules)),
        (
            "capture: {method: rules}",
            false,
            Err("use method auto or policies"),
        ),
    ] {
        let f = function(yaml);
        let c = if ours { conn(&[]) } else { stock_conn(&[]) };
        match (f.method(&c), want) {
            (Ok(got), Ok(w)) => assert_eq!(got, w, "{yaml} {ours}"),
            (Err(e), Err(w)) => {
                assert!(matches!(e, FunctionError::Precondition { .. }));
                assert!(e.to_string().contains(w), "{e}");
            }
            (got, w) => panic!("{yaml} {ours}: {got:?} vs {w:?}"),
        }
    }
}

#[tokio::test]
async fn labels_add_exclusions_to_the_clients_spec() {
    let f = function("");
    let mut c = conn(&[
        (labels::PLACEMENT, "sidecar"),
        (labels::EXCLUDE_OUTBOUND_PORTS, "22;2222"),
        (labels::EXCLUDE_INBOUND_PORTS, "8443"),
        (labels::EXCLUDE_OUTBOUND_CIDRS, "198.19.0.0/16"),
    ]);
    f.apply(&mut c).await.unwrap();
    let spec = RedirectSpec::from_json(extra(&c).unwrap()).unwrap();
    // The configured (istio default) exclusions stay; the labels' are added.
    assert_eq!(
        spec.exclude_outbound_ports,
        [Port(15020), Port(22), Port(2222)]
    );
    assert!(spec.exclude_inbound_ports.contains(&Port(8443)));
    assert!(spec.exclude_inbound_ports.contains(&Port(15021)));
    assert_eq!(
        spec.exclude_outbound_cidrs,
        ["198.19.0.0/16".parse::<ipnet::IpNet>().unwrap()]
    );
}

#[tokio::test]
async fn bad_labels_are_refused_naming_the_label_and_change_nothing() {
    let f = function("placement: sidecar\n");
    for (labels, want) in [
        (
            vec![(labels::EXCLUDE_OUTBOUND_PORTS, "22,ssh")],
            "label \"proxy-exclude-outbound-ports\": \"ssh\" is not a port",
        ),
        (
            vec![("proxy-colour", "blue")],
            "label \"proxy-colour\": unknown proxy-* label",
        ),
        (
            vec![(labels::EXCLUDE_OUTBOUND_CIDRS, "fd00::/8")],
            "label \"proxy-exclude-outbound-cidrs\": the client's redirect spec would be invalid: \
             excludeOutboundCidrs: fd00::/8 is an IPv6 prefix but ipv6 is false",
        ),
        (
            vec![
                (labels::PLACEMENT, "proxy"),
                (labels::EXCLUDE_INBOUND_PORTS, "80"),
            ],
            "label \"proxy-exclude-inbound-ports\" applies to placement sidecar only",
        ),
    ] {
        let mut c = conn(&labels);
        let before = c.clone();
        let e = f.apply(&mut c).await.unwrap_err();
        assert!(matches!(e, FunctionError::Rejected { .. }), "{e}");
        assert!(e.to_string().contains(want), "{labels:?}: {e}");
        assert_eq!(c, before, "nothing changed");
    }
}

#[tokio::test]
async fn proxy_placement_without_cap_net_admin_is_a_failed_precondition() {
    let f = function("");
    let mut c = conn(&[]);
    let before = c.clone();
    let e = f.apply(&mut c).await.unwrap_err();
    assert!(matches!(e, FunctionError::Precondition { .. }), "{e}");
    assert!(e.to_string().contains("needs CAP_NET_ADMIN"), "{e}");
    assert_eq!(c, before);
    // The same connection may still ask for placement sidecar.
    let mut c = conn(&[(labels::PLACEMENT, "sidecar")]);
    f.apply(&mut c).await.unwrap();
    assert!(extra(&c).is_some());
}

#[tokio::test]
async fn an_injected_proxy_is_named_only_to_a_forwarder_that_offers_it() {
    let f = function("placement: sidecar\nsidecarProxy: haproxy\n");
    let mut c = stock_conn(&[]);
    forwarder_plugin::hop::announce(&mut c, "envoy,haproxy");
    f.apply(&mut c).await.unwrap();
    let extra = &c.context.as_ref().unwrap().extra_context;
    assert_eq!(extra[CLIENT_PROXY_KEY], "haproxy");
    assert!(
        extra.contains_key(CLIENT_REDIRECT_KEY),
        "and the rules that feed it"
    );
    assert!(
        !extra.contains_key(FORWARDER_PROXIES_KEY),
        "the forwarder's announcement is not echoed"
    );

    for (offered, want) in [
        ("envoy", "offers only envoy"),
        ("", "does not announce client-proxy"),
    ] {
        let mut c = stock_conn(&[]);
        forwarder_plugin::hop::announce(&mut c, offered);
        let before = c.clone();
        let e = f.apply(&mut c).await.unwrap_err();
        assert!(matches!(e, FunctionError::Precondition { .. }), "{e}");
        assert!(e.to_string().contains(want), "{offered:?}: {e}");
        assert_eq!(c, before, "nothing written on refusal");
    }

    let e = FunctionConfig::parse("placement: sidecar\nsidecarProxy: /bin/sh\n").unwrap_err();
    assert!(e.to_string().contains("sidecarProxy"), "{e}");
}
