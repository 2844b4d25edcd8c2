//! Bad input to mesh-proxy-nse: each is refused with a status code and a
//! message that says what was wrong, keeps no state, and does not hurt the
//! endpoint (it still serves and its one /31 pair is still free afterwards).

mod nse_support;

use nse_support::*;
use nsm_api::connection::{Connection, MonitorScopeSelector};
use nsm_api::connectioncontext::{ConnectionContext, IpContext};
use nsm_api::networkservice::NetworkServiceRequest;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn with_ip(ipc: IpContext) -> NetworkServiceRequest {
    let mut req = req_p();
    conn_mut(&mut req).context = Some(ConnectionContext {
        ip_context: Some(ipc),
        ..Default::default()
    });
    req
}

/// (what, request, metadata, expected code, expected message part)
fn cases() -> Vec<(&'static str, NetworkServiceRequest, Metadata, Code, String)> {
    let fwd = Metadata::forwarder;
    let mut v = Vec::new();

    v.push((
        "no connection",
        NetworkServiceRequest::default(),
        fwd(),
        Code::InvalidArgument,
        "request.connection is missing".into(),
    ));

    let mut r = req_p();
    conn_mut(&mut r).id.clear();
    v.push((
        "empty id",
        r,
        fwd(),
        Code::InvalidArgument,
        "connection.id is empty".into(),
    ));

    let mut r = req_p();
    conn_mut(&mut r)
        .labels
        .insert("app".into(), "x\u{7}y".into());
    v.push((
        "label value",
        r,
        fwd(),
        Code::InvalidArgument,
        "connection.labels[\"app\"] contains control character U+0007".into(),
    ));

    let mut r = req_p();
    conn_mut(&mut r).labels.insert("a\nb".into(), "x".into());
    v.push((
        "label key",
        r,
        fwd(),
        Code::InvalidArgument,
        "connection.labels key \"a\\nb\" contains control character U+000A".into(),
    ));

    let mut r = req_p();
    r.mechanism_preferences[1]
        .parameters
        .insert("name".into(), "eth\t0".into());
    v.push((
        "mechanism parameter",
        r,
        fwd(),
        Code::InvalidArgument,
        "mechanism_preferences[1].parameters[\"name\"] contains control character U+0009".into(),
    ));

    let mut r = req_p();
    r.mechanism_preferences[1]
        .parameters
        .insert("name".into(), "much-too-long-name".into());
    v.push(("interface name", r, fwd(), Code::InvalidArgument, "KERNEL mechanism parameter name: interface name \"much-too-long-name\" is longer than 15 bytes".into()));

    let mut r = req_p();
    r.mechanism_preferences = vec![mechanism("VXLAN"), mechanism("")];
    v.push((
        "unknown mechanisms",
        r,
        fwd(),
        Code::InvalidArgument,
        "cannot support any of the requested mechanisms: VXLAN, \"\"".into(),
    ));

    let mut r = req_p();
    conn_mut(&mut r).path.as_mut().unwrap().index = 7;
    v.push((
        "index out of range",
        r,
        fwd(),
        Code::InvalidArgument,
        "connection.path.index 7 is out of range".into(),
    ));

    let r = with_ip(IpContext {
        excluded_prefixes: vec!["198.18.0.0/33".into()],
        ..Default::default()
    });
    v.push((
        "excluded prefix",
        r,
        fwd(),
        Code::InvalidArgument,
        "ip_context.excluded_prefixes: \"198.18.0.0/33\" is not a CIDR".into(),
    ));

    let r = with_ip(IpContext {
        src_ip_addrs: vec!["198.18.1.101".into()],
        ..Default::default()
    });
    v.push((
        "presented address",
        r,
        fwd(),
        Code::InvalidArgument,
        "ip_context.src_ip_addrs: \"198.18.1.101\" is not a CIDR".into(),
    ));

    let md = Metadata {
        expires: Some("next tuesday".into()),
        ..fwd()
    };
    v.push((
        "token expiry",
        req_p(),
        md,
        Code::InvalidArgument,
        "metadata nsm-client-token-expires \"next tuesday\" is not an RFC 3339 time".into(),
    ));

    let md = Metadata {
        expires: None,
        ..fwd()
    };
    v.push((
        "token without expiry",
        req_p(),
        md,
        Code::InvalidArgument,
        "metadata nsm-client-token is set without nsm-client-token-expires".into(),
    ));

    let mut r = req_p();
    conn_mut(&mut r)
        .labels
        .insert("big".into(), "x".repeat(5 << 20));
    v.push((
        "oversized message",
        r,
        fwd(),
        Code::OutOfRange,
        "the limit is: 4194304 bytes".into(),
    ));
    v
}

#[tokio::test]
async fn bad_requests_are_refused_with_a_reason_and_leave_nothing() {
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "198.18.1.100/31")]).await;
    let (mut monitor, _) = nse.monitor(MonitorScopeSelector::default()).await;
    for (what, req, md, code, want) in cases() {
        let e = nse.request_with(req, &md).await.expect_err(what);
        assert_eq!(e.code(), code, "{what}: {}", e.message());
        assert!(
            e.message().contains(&want),
            "{what}: {:?} lacks {want:?}",
            e.message()
        );
    }
    assert_eq!(
        nse.health("networkservice.NetworkService").await.unwrap(),
        ServingStatus::Serving
    );
    let (_, state) = nse.monitor(MonitorScopeSelector::default()).await;
    assert!(state.connections.is_empty());
    assert!(
        next_event_within(&mut monitor, std::time::Duration::from_millis(200))
            .await
            .is_none()
    );
    let (ok, _) = nse
        .request(req_p())
        .await
        .expect("a good request still works");
    assert_eq!(
        ip(&ok).dst_ip_addrs,
        ["198.18.1.100/32"],
        "the pool was not touched"
    );
}

#[tokio::test]
async fn bad_closes_and_selectors_are_refused() {
    let nse = Nse::start(&[]).await;
    let (mut client, _) = nse.dial().await;
    let e = client.close(Connection::default()).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "connection.id is empty")
    );

    let mut c = conn_of(&req_p()).clone();
    c.path.as_mut().unwrap().index = 9;
    let e = nse.close(c).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("connection.path.index 9 is out of range"),
        "{}",
        e.message()
    );

    let (ch, _) = nsm_api::grpcfd::dial(&nse.socket).await.unwrap();
    let sel = MonitorScopeSelector {
        network_services: vec!["a\u{0}".into()],
        ..Default::default()
    };
    let e = nsm_api::connection::monitor_connection_client::MonitorConnectionClient::new(ch)
        .monitor_connections(sel)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("selector.network_services[0] contains control character U+0000"),
        "{}",
        e.message()
    );
}

fn excluding(n: u32) -> NetworkServiceRequest {
    let list: Vec<String> = (0..n)
        .map(|i| {
            // Far apart, so subtracting them leaves many routes.
            let a = 0xc613_0000u32.wrapping_add(i << 12);
            std::net::Ipv4Addr::from(a).to_string()
        })
        .collect();
    let mut req = req_p();
    conn_mut(&mut req)
        .labels
        .insert("proxy-exclude-outbound-cidrs".into(), list.join(","));
    req
}

/// Work a caller can ask for is bounded: 20,000 excluded addresses (a
/// label of 300 KB) and 2,000 (over the 1,024 exclusions a connection may
/// have) are refused at once, naming the limit, and health answers while
/// they are handled; 1,000 are fine behind our forwarder (rules) and
/// refused behind NSM's (policies: too many routes), quickly either way.
/// The calls carry a 5 s deadline: an answer after it would fail the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_exclusion_lists_are_answered_at_once() {
    if !is_root() {
        // Without root the NSE runs in placement sidecar, where exclusions
        // are not subtracted at all.
        if nsm_tests::require_root("large_exclusion_lists_are_answered_at_once") {
            unreachable!();
        }
        return;
    }
    let nse = std::sync::Arc::new(Nse::start(&[("NSM_CIDR_PREFIX", "198.18.2.0/30")]).await);
    let deadline = |mut r: tonic::Request<NetworkServiceRequest>| {
        r.set_timeout(std::time::Duration::from_secs(5));
        r
    };
    for (n, want) in [
        (20_000, "bytes, at most 65536"),
        (2_000, "2000 CIDRs, at most 1024"),
        (1_000, "use method rules"),
    ] {
        let health = {
            let nse = nse.clone();
            tokio::spawn(async move { nse.health("networkservice.NetworkService").await })
        };
        let (mut client, _) = nse.dial().await;
        let e = match client
            .request(deadline(Metadata::forwarder().wrap(excluding(n))))
            .await
        {
            Ok(_) => panic!("{n} exclusions were accepted"),
            Err(e) => e,
        };
        assert_eq!(e.code(), Code::InvalidArgument, "{n}: {e:?}");
        assert!(e.message().contains(want), "{n}: {}", e.message());
        assert_eq!(health.await.unwrap().unwrap(), ServingStatus::Serving);
    }
    // Behind our forwarder the same 1,000 go into the client's rules.
    let mut req = excluding(1_000);
    forwarder_plugin::hop::announce_features(conn_mut(&mut req));
    let (mut client, _) = nse.dial().await;
    let conn = client
        .request(deadline(Metadata::forwarder().wrap(req)))
        .await
        .expect("1,000 exclusions in method rules")
        .into_inner();
    let spec = forwarder_plugin::hop::client_capture(&conn)
        .unwrap()
        .unwrap();
    assert_eq!(spec.exclude_cidrs.len(), 1_000);
}
