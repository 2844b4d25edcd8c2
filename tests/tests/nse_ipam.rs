//! mesh-proxy-nse's point-to-point IPAM seen from a forwarder (nsm-wire.md §9
//! cases 8, 9, 11, 17; §3.4): dst first then src, routes, exhaustion,
//! excluded prefixes, freeing on Close, dual-stack groups, and recovery of a
//! client's addresses after an NSE restart under the polite and strict policies.

mod nse_support;

use nse_support::*;
use nsm_api::connection::{Connection, ConnectionEventType, MonitorScopeSelector};
use nsm_api::connectioncontext::{ConnectionContext, IpContext, Route};
use tonic::Code;

fn with_ip(
    mut req: nsm_api::networkservice::NetworkServiceRequest,
    ipc: IpContext,
) -> nsm_api::networkservice::NetworkServiceRequest {
    conn_mut(&mut req).context = Some(ConnectionContext {
        ip_context: Some(ipc),
        ..Default::default()
    });
    req
}

#[tokio::test]
async fn slash31_gives_dst_then_src_with_routes() {
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "198.18.1.100/31")]).await;
    let (conn, _) = nse.request(req_p()).await.expect("Request");
    let ipc = ip(&conn);
    assert_eq!(ipc.dst_ip_addrs, ["198.18.1.100/32"], "endpoint side first");
    assert_eq!(ipc.src_ip_addrs, ["198.18.1.101/32"], "client side second");
    assert_eq!(p2p_routes(&ipc.src_routes), ["198.18.1.100/32"]);
    assert_eq!(routes(&ipc.dst_routes), ["198.18.1.101/32"]);
}

#[tokio::test]
async fn exhausted_pool_refuses_without_an_event_and_close_frees_the_pair() {
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "198.18.1.100/31")]).await;
    let (first, _) = nse.request(req_p()).await.unwrap();
    let (mut monitor, _) = nse.monitor(MonitorScopeSelector::default()).await;

    let e = nse.request(req_p()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("198.18.1.100/31"), "{}", e.message());

    nse.close(first.clone()).await.expect("Close");
    // The refused Request produced no UPDATE: the next event is the Close's DELETE.
    let ev = next_event(&mut monitor).await.expect("an event");
    assert_eq!(ev.r#type, ConnectionEventType::Delete as i32);
    assert!(ev.connections.contains_key(&nse_segment(&first).id));

    let (again, _) = nse
        .request(req_p())
        .await
        .expect("the freed pair is available again");
    assert_eq!(ip(&again).dst_ip_addrs, ["198.18.1.100/32"]);
    assert_eq!(ip(&again).src_ip_addrs, ["198.18.1.101/32"]);
}

#[tokio::test]
async fn excluded_prefixes_are_avoided() {
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "198.18.1.100/30")]).await;
    let req = with_ip(
        req_p(),
        IpContext {
            excluded_prefixes: vec!["198.18.1.101/32".into()],
            ..Default::default()
        },
    );
    let (conn, _) = nse.request(req).await.unwrap();
    assert_eq!(ip(&conn).dst_ip_addrs, ["198.18.1.100/32"]);
    assert_eq!(ip(&conn).src_ip_addrs, ["198.18.1.102/32"]);
    assert_eq!(ip(&conn).excluded_prefixes, ["198.18.1.101/32"]);
}

#[tokio::test]
async fn v4_and_v6_groups_give_one_pair_each() {
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "[198.18.2.0/31], [fd00::a00/127]")]).await;
    let (conn, _) = nse.request(req_p()).await.unwrap();
    let ipc = ip(&conn);
    assert_eq!(ipc.dst_ip_addrs, ["198.18.2.0/32", "fd00::a00/128"]);
    assert_eq!(ipc.src_ip_addrs, ["198.18.2.1/32", "fd00::a01/128"]);
    assert_eq!(
        p2p_routes(&ipc.src_routes),
        ["198.18.2.0/32", "fd00::a00/128"]
    );
    assert_eq!(routes(&ipc.dst_routes), ["198.18.2.1/32", "fd00::a01/128"]);
    // The v6 group is as exhausted as the v4 one.
    assert_eq!(
        nse.request(req_p()).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
}

#[tokio::test]
async fn refresh_keeps_the_addresses() {
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "198.18.1.100/31")]).await;
    let (conn, _) = nse.request(req_p()).await.unwrap();
    // With a /31 a refresh that allocated again would fail.
    let (refreshed, _) = nse.request(refresh_of(&conn)).await.expect("refresh");
    assert_eq!(ip(&refreshed), ip(&conn), "same addresses, no duplicates");
}

/// Three connections on NSE `a`; returns the third (its pair is not the lowest).
async fn third_connection(nse: &Nse) -> Connection {
    nse.request(req_p()).await.unwrap();
    nse.request(req_p()).await.unwrap();
    let (c, _) = nse.request(req_p()).await.unwrap();
    assert_eq!(ip(&c).dst_ip_addrs, ["198.18.3.4/32"]);
    c
}

#[tokio::test]
async fn a_known_client_gets_its_addresses_back_after_a_restart() {
    for policy in ["polite", "strict"] {
        let env = [
            ("NSM_CIDR_PREFIX", "198.18.3.0/24"),
            ("NSM_IPAM_POLICY", policy),
            ("NSM_NAME", "nse-restart"),
        ];
        let conn = {
            let nse = Nse::start(&env).await;
            third_connection(&nse).await
        }; // killed
        let nse = Nse::start(&env).await;
        let (back, _) = nse
            .request(refresh_of(&conn))
            .await
            .expect("refresh after restart");
        assert_eq!(
            nse_segment(&back).id,
            nse_segment(&conn).id,
            "{policy}: same segment"
        );
        assert_eq!(
            ip(&back).dst_ip_addrs,
            ["198.18.3.4/32"],
            "{policy}: recovered, not .0"
        );
        assert_eq!(ip(&back).src_ip_addrs, ["198.18.3.5/32"], "{policy}");
        // And they are taken now: a new client gets the lowest free pair.
        let (other, _) = nse.request(req_p()).await.unwrap();
        assert_eq!(ip(&other).dst_ip_addrs, ["198.18.3.0/32"], "{policy}");
    }
}

fn foreign() -> IpContext {
    // Addresses from some other endpoint's pool (e.g. before a heal to this one).
    IpContext {
        src_ip_addrs: vec!["198.19.0.1/32".into()],
        dst_ip_addrs: vec!["198.19.0.0/32".into()],
        src_routes: vec![Route {
            prefix: "198.19.0.0/32".into(),
            ..Default::default()
        }],
        dst_routes: vec![Route {
            prefix: "198.19.0.1/32".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn polite_keeps_foreign_addresses_strict_drops_them() {
    let polite = Nse::start(&[
        ("NSM_CIDR_PREFIX", "198.18.3.0/24"),
        ("NSM_IPAM_POLICY", "polite"),
    ])
    .await;
    let (conn, _) = polite.request(with_ip(req_p(), foreign())).await.unwrap();
    // Polite keeps the client's side; the endpoint's side is IPAM's alone.
    assert_eq!(ip(&conn).src_ip_addrs, ["198.19.0.1/32", "198.18.3.1/32"]);
    assert_eq!(ip(&conn).dst_ip_addrs, ["198.18.3.0/32"]);
    assert_eq!(routes(&ip(&conn).dst_routes), ["198.18.3.1/32"]);

    let strict = Nse::start(&[
        ("NSM_CIDR_PREFIX", "198.18.3.0/24"),
        ("NSM_IPAM_POLICY", "strict"),
    ])
    .await;
    let (conn, _) = strict.request(with_ip(req_p(), foreign())).await.unwrap();
    assert_eq!(ip(&conn).src_ip_addrs, ["198.18.3.1/32"]);
    assert_eq!(ip(&conn).dst_ip_addrs, ["198.18.3.0/32"]);
    assert_eq!(p2p_routes(&ip(&conn).src_routes), ["198.18.3.0/32"]);
    assert_eq!(routes(&ip(&conn).dst_routes), ["198.18.3.1/32"]);
}

#[tokio::test]
async fn strict_does_not_hand_out_another_clients_addresses() {
    let nse = Nse::start(&[
        ("NSM_CIDR_PREFIX", "198.18.3.0/24"),
        ("NSM_IPAM_POLICY", "strict"),
    ])
    .await;
    let (a, _) = nse.request(req_p()).await.unwrap();
    // A stale context claiming a's addresses.
    let stolen = IpContext {
        src_ip_addrs: ip(&a).src_ip_addrs.clone(),
        dst_ip_addrs: ip(&a).dst_ip_addrs.clone(),
        ..Default::default()
    };
    let (b, _) = nse.request(with_ip(req_p(), stolen)).await.unwrap();
    assert_eq!(ip(&b).dst_ip_addrs, ["198.18.3.2/32"]);
    assert_eq!(ip(&b).src_ip_addrs, ["198.18.3.3/32"]);
}
