//! A connection's life at mesh-proxy-nse (nsm-wire.md §9 cases 10, 17–24,
//! 26): refresh, Close (twice, unknown, bare), expiry without refresh and its
//! postponement, reselect, the monitor streams, and Request/Close races.

mod nse_support;

use std::time::{Duration, Instant};

use nse_support::*;
use nsm_api::connection::{
    ConnectionEvent, ConnectionEventType, MonitorScopeSelector, PathSegment, State,
};
use tonic::Code;

fn kind(ev: &ConnectionEvent) -> ConnectionEventType {
    ConnectionEventType::try_from(ev.r#type).unwrap()
}

fn by_fwd(id: &str) -> MonitorScopeSelector {
    MonitorScopeSelector {
        path_segments: vec![PathSegment {
            name: "fwd".into(),
            id: id.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn refresh_keeps_identity_with_a_new_token() {
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "198.18.1.100/31")]).await;
    let (conn, _) = nse.request(req_p()).await.unwrap();
    let (mut monitor, _) = nse.monitor(MonitorScopeSelector::default()).await;
    // Tokens have whole-second expiry: make the new one differ.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let mut again = refresh_of(&conn);
    let new_fwd_token = "fwd-token-refresh";
    let md = Metadata {
        token: Some(new_fwd_token.into()),
        ..Metadata::forwarder()
    };
    conn_mut(&mut again).path.as_mut().unwrap().path_segments[2].token = "stale".into();
    let (refreshed, fds) = nse.request_with(again, &md).await.expect("refresh");

    let (old, new) = (nse_segment(&conn), nse_segment(&refreshed));
    assert_eq!(new.id, old.id, "same endpoint segment");
    assert_eq!(refreshed.id, conn.id);
    assert_eq!(
        ip(&refreshed),
        ip(&conn),
        "same addresses (a /31 has no second pair)"
    );
    let (m_old, m_new) = (
        conn.mechanism.as_ref().unwrap(),
        refreshed.mechanism.as_ref().unwrap(),
    );
    assert_eq!(
        m_new.parameters["name"], m_old.parameters["name"],
        "same interface name"
    );
    assert_ne!(new.token, old.token, "a new token");
    assert!(new.expires.as_ref().unwrap().seconds > old.expires.as_ref().unwrap().seconds);
    assert_eq!(
        segments(&refreshed)[2].token,
        new_fwd_token,
        "the forwarder's new token"
    );
    received_netns(&fds, &refreshed).await;

    let ev = next_event(&mut monitor).await.unwrap();
    assert_eq!(kind(&ev), ConnectionEventType::Update);
    assert_eq!(ev.connections[&new.id].path.as_ref().unwrap().index, 3);
}

#[tokio::test]
async fn close_deletes_once_and_unknown_close_is_quiet() {
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "198.18.1.100/31")]).await;
    let (conn, _) = nse.request(req_p()).await.unwrap();
    let nse_id = nse_segment(&conn).id.clone();
    let (mut monitor, _) = nse.monitor(MonitorScopeSelector::default()).await;

    // The Close carries neither context nor mechanism: the NSE uses what it returned.
    let mut bare = conn.clone();
    bare.context = None;
    bare.mechanism = None;
    nse.close(bare).await.expect("Close");
    let ev = next_event(&mut monitor).await.unwrap();
    assert_eq!(kind(&ev), ConnectionEventType::Delete);
    let deleted = &ev.connections[&nse_id];
    assert_eq!(
        ip(deleted).dst_ip_addrs,
        ["198.18.1.100/32"],
        "the stored connection was closed"
    );
    assert!(deleted.mechanism.is_some());

    nse.close(conn.clone())
        .await
        .expect("second Close is Empty");
    let mut unknown = req_p();
    conn_mut(&mut unknown)
        .path
        .as_mut()
        .unwrap()
        .path_segments
        .push(PathSegment {
            name: nse.name.clone(),
            id: "never-seen".into(),
            ..Default::default()
        });
    nse.close(conn_of(&unknown).clone())
        .await
        .expect("unknown Close is Empty");
    assert!(
        next_event_within(&mut monitor, Duration::from_millis(500))
            .await
            .is_none(),
        "no events"
    );

    // The pair was freed by the first Close.
    let (again, _) = nse.request(req_p()).await.unwrap();
    assert_eq!(ip(&again).dst_ip_addrs, ["198.18.1.100/32"]);
}

#[tokio::test]
async fn unrefreshed_connection_is_closed_before_its_token_expires() {
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "198.18.1.100/31")]).await;
    let (mut monitor, _) = nse.monitor(MonitorScopeSelector::default()).await;
    // The forwarder's token expires in 3 s and its request deadline is 1 s: close at ≈2 s.
    let md = Metadata::expiring_in(Duration::from_secs(3), Some(Duration::from_secs(1)));
    let start = Instant::now();
    let (conn, _) = nse.request_with(req_p(), &md).await.unwrap();
    assert_eq!(
        kind(&next_event(&mut monitor).await.unwrap()),
        ConnectionEventType::Update
    );

    let ev = next_event(&mut monitor).await.expect("DELETE on expiry");
    let at = start.elapsed();
    assert_eq!(kind(&ev), ConnectionEventType::Delete);
    assert!(ev.connections.contains_key(&nse_segment(&conn).id));
    assert!(
        at >= Duration::from_millis(1500) && at <= Duration::from_millis(2700),
        "closed after {at:?}"
    );
    // Its addresses are free again.
    let (next, _) = nse.request(req_p()).await.unwrap();
    assert_eq!(ip(&next).dst_ip_addrs, ["198.18.1.100/32"]);
}

#[tokio::test]
async fn refresh_moves_the_expiry() {
    let nse = Nse::start(&[]).await;
    let (mut monitor, _) = nse.monitor(MonitorScopeSelector::default()).await;
    let short = || Metadata::expiring_in(Duration::from_secs(3), Some(Duration::from_secs(1)));
    let start = Instant::now();
    let (conn, _) = nse.request_with(req_p(), &short()).await.unwrap();
    next_event(&mut monitor).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (conn, _) = nse
        .request_with(refresh_of(&conn), &short())
        .await
        .expect("refresh");
    assert_eq!(
        kind(&next_event(&mut monitor).await.unwrap()),
        ConnectionEventType::Update
    );

    // The first deadline (≈2 s) passes without a DELETE; the new one (≈3 s) closes it.
    let ev = next_event(&mut monitor)
        .await
        .expect("DELETE at the moved deadline");
    assert_eq!(kind(&ev), ConnectionEventType::Delete);
    assert!(ev.connections.contains_key(&nse_segment(&conn).id));
    let at = start.elapsed();
    assert!(
        at >= Duration::from_millis(2600),
        "closed at the old deadline: {at:?}"
    );
}

#[tokio::test]
async fn reselect_closes_the_old_state_then_connects_again() {
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "198.18.1.100/31")]).await;
    let (conn, _) = nse.request(req_p()).await.unwrap();
    let (mut monitor, _) = nse.monitor(MonitorScopeSelector::default()).await;

    // What a healing client sends: state RESELECT_REQUESTED, mechanism cleared.
    let mut reselect = refresh_of(&conn);
    conn_mut(&mut reselect).state = State::ReselectRequested as i32;
    conn_mut(&mut reselect).mechanism = None;
    let (again, fds) = nse.request(reselect).await.expect("reselect");
    assert_eq!(again.state, State::Up as i32);
    received_netns(&fds, &again).await;

    let first = next_event(&mut monitor).await.unwrap();
    assert_eq!(
        kind(&first),
        ConnectionEventType::Delete,
        "old state closed first"
    );
    let second = next_event(&mut monitor).await.unwrap();
    assert_eq!(kind(&second), ConnectionEventType::Update);
    let id = &nse_segment(&again).id;
    assert_eq!(second.connections[id].state, State::Up as i32);
    // The /31 pair went back to the pool and was recovered from the presented context.
    assert_eq!(ip(&again).dst_ip_addrs, ["198.18.1.100/32"]);
}

#[tokio::test]
async fn monitor_streams_initial_state_updates_and_deletes() {
    let nse = Nse::start(&[]).await;
    let req = req_p();
    let fwd_id = conn_of(&req).id.clone();
    let (mut mine, initial) = nse.monitor(by_fwd(&fwd_id)).await;
    assert!(
        initial.connections.is_empty(),
        "initial transfer is sent even when empty"
    );
    let (mut other_id, _) = nse.monitor(by_fwd("zz")).await;
    let (mut other_svc, _) = nse
        .monitor(MonitorScopeSelector {
            network_services: vec!["other".into()],
            ..Default::default()
        })
        .await;

    let (conn, _) = nse.request(req.clone()).await.unwrap();
    let nse_id = nse_segment(&conn).id.clone();
    let ev = next_event(&mut mine).await.unwrap();
    assert_eq!(kind(&ev), ConnectionEventType::Update);
    let seen = &ev.connections[&nse_id];
    assert_eq!(seen.id, nse_id, "as the endpoint sees it");
    assert_eq!(seen.path.as_ref().unwrap().index, 3);
    assert_eq!(seen.state, State::Up as i32);

    // A late subscriber gets it in its initial transfer.
    let (_, late) = nse.monitor(by_fwd(&fwd_id)).await;
    assert!(late.connections.contains_key(&nse_id));

    nse.close(conn).await.unwrap();
    let ev = next_event(&mut mine).await.unwrap();
    assert_eq!(kind(&ev), ConnectionEventType::Delete);
    assert!(ev.connections.contains_key(&nse_id));

    // The stream stays open: the same forwarder connection id comes back.
    nse.request(req).await.unwrap();
    assert_eq!(
        kind(&next_event(&mut mine).await.unwrap()),
        ConnectionEventType::Update
    );

    for (what, s) in [
        ("other id", &mut other_id),
        ("other service", &mut other_svc),
    ] {
        assert!(
            next_event_within(s, Duration::from_millis(300))
                .await
                .is_none(),
            "{what} got an event"
        );
    }
}

/// Requests (refreshes) and Closes of one connection from two forwarder connections at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_request_and_close_end_consistent() {
    let nse = std::sync::Arc::new(Nse::start(&[("NSM_CIDR_PREFIX", "198.18.1.100/31")]).await);
    let (conn, _) = nse.request(req_p()).await.unwrap();
    let nse_id = nse_segment(&conn).id.clone();
    let (mut monitor, _) = nse.monitor(MonitorScopeSelector::default()).await;

    const ROUNDS: usize = 25;
    let requester = {
        let (nse, conn) = (nse.clone(), conn.clone());
        tokio::spawn(async move {
            for _ in 0..ROUNDS {
                nse.request(refresh_of(&conn))
                    .await
                    .expect("Request in the race");
            }
        })
    };
    let closer = {
        let (nse, conn) = (nse.clone(), conn.clone());
        tokio::spawn(async move {
            for _ in 0..ROUNDS {
                nse.close(conn.clone()).await.expect("Close in the race");
            }
        })
    };
    requester.await.unwrap();
    closer.await.unwrap();

    let mut events = Vec::new();
    while let Some(ev) = next_event_within(&mut monitor, Duration::from_millis(500)).await {
        assert!(ev.connections.contains_key(&nse_id));
        events.push(kind(&ev));
    }
    assert!(
        events.len() >= ROUNDS,
        "every Request made an UPDATE: {events:?}"
    );
    assert!(
        !events
            .windows(2)
            .any(|w| w == [ConnectionEventType::Delete; 2]),
        "a Close of a closed connection emitted DELETE: {events:?}"
    );
    let open = *events.last().unwrap() == ConnectionEventType::Update;
    // The endpoint's state agrees with the last event: the /31 pair is held iff it is open...
    let other = nse.request(req_p()).await;
    if open {
        assert_eq!(other.unwrap_err().code(), Code::ResourceExhausted);
    } else {
        other.expect("pair free after the final DELETE");
    }
    // ...and so does a fresh monitor's initial state.
    let (_, state) = nse.monitor(MonitorScopeSelector::default()).await;
    assert_eq!(state.connections.contains_key(&nse_id), open, "{events:?}");
}

/// `NSM_METRICS_LISTEN_ON`: Prometheus text on `GET /metrics` — Requests and
/// Closes by gRPC code, their latency histogram, the connections now, by
/// function and by chain, and the rule writes by backend.
#[tokio::test]
async fn metrics_count_calls_by_code_and_connections() {
    if !is_root() {
        eprintln!("SKIPPED metrics test: needs root for the NSE's own namespace");
        assert!(!nsm_tests::in_ci(), "CI=true: needs root");
        return;
    }
    let nse = Nse::start(&[("NSM_METRICS_LISTEN_ON", "127.0.0.1:9465")]).await;
    let ns = nse.netns.as_ref().expect("its namespace");
    let scrape = || {
        // Inside the NSE's namespace: its 127.0.0.1.
        let out = ns.exec_ok(&[
            "bash",
            "-c",
            "exec 3<>/dev/tcp/127.0.0.1/9465 && printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3",
        ]);
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        out
    };
    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
    };
    let (conn, _) = nse.request(req_p()).await.expect("Request");
    let mut bad = req_p();
    bad.connection.as_mut().unwrap().network_service = "no-such-service".into();
    let refused = nse.request(bad).await.unwrap_err();
    let text = scrape();
    assert_eq!(
        value(
            &text,
            r#"nsm_endpoint_calls_total{method="Request",code="Ok"} "#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            &format!(
                r#"nsm_endpoint_calls_total{{method="Request",code="{:?}"}} "#,
                refused.code()
            )
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "nsm_endpoint_connections "),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &text,
            r#"nsm_endpoint_call_duration_seconds_count{method="Request"} "#
        ),
        Some(2.0),
        "{text}"
    );
    // By function and chain (the default configuration: mesh-proxy alone),
    // and the rule writes that put its interface in the table.
    let by_function = r#"nsm_endpoint_function_connections{function="mesh-proxy"} "#;
    let by_chain = r#"nsm_endpoint_chain_connections{chain="default"} "#;
    assert_eq!(value(&text, by_function), Some(1.0), "{text}");
    assert_eq!(value(&text, by_chain), Some(1.0), "{text}");
    let writes = r#"nsm_endpoint_rules_apply_duration_seconds_count{backend="nft"} "#;
    assert!(value(&text, writes).is_some_and(|n| n >= 1.0), "{text}");

    nse.close(conn).await.expect("Close");
    let text = scrape();
    assert_eq!(
        value(
            &text,
            r#"nsm_endpoint_calls_total{method="Close",code="Ok"} "#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "nsm_endpoint_connections "),
        Some(0.0),
        "{text}"
    );
    assert_eq!(value(&text, by_function), Some(0.0), "{text}");
    assert_eq!(value(&text, by_chain), Some(0.0), "{text}");
}

/// JSON log lines from inside a function carry the connection id and the
/// function's name (the span each function's apply and undo runs in).
#[tokio::test]
async fn function_log_lines_name_the_connection_and_the_function() {
    if !nsm_tests::require_root("function log fields") {
        return;
    }
    let nse = Nse::start(&[("NSM_LOG_FORMAT", "json")]).await;
    let (conn, _) = nse.request(req_p()).await.expect("Request");
    let log = nse.log();
    let line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["fields"]["message"] == "mesh-proxy applied")
        .unwrap_or_else(|| panic!("no 'mesh-proxy applied' line:\n{log}"));
    let spans = line["spans"].as_array().cloned().unwrap_or_default();
    assert!(
        spans.iter().any(|s| s["name"] == "apply"
            && s["function"] == "mesh-proxy"
            && s["id"].as_str().is_some_and(|id| !id.is_empty())
            && s["id"] == line["fields"]["id"]),
        "{line}"
    );
    nse.close(conn).await.expect("Close");
}

/// A metrics port another process holds is one error line; the endpoint
/// serves anyway.
#[tokio::test]
async fn a_metrics_port_in_use_is_logged_and_the_endpoint_serves() {
    if !nsm_tests::require_root("metrics port in use") {
        return;
    }
    let ns = nsm_tests::netns::TestNetns::new("metr");
    let held = forwarder_plugin::netns::Netns::open_path(std::path::Path::new(&ns.path()))
        .unwrap()
        .run(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let nse = Nse::start_with(
        &[("NSM_METRICS_LISTEN_ON", &addr)],
        StartOptions {
            netns: Some(ns),
            ..Default::default()
        },
    )
    .await;
    let (conn, _) = nse.request(req_p()).await.expect("Request");
    nse.close(conn).await.expect("Close");
    let log = nse.log();
    assert_eq!(log.matches("cannot serve metrics").count(), 1, "{log}");
    assert!(log.contains(&addr), "the line names the address: {log}");
    drop(held);
}

/// A forwarder builds the NSE's side of a connection after the NSE's answer;
/// one that dies first (or whose answer was lost) never Closes it, and its
/// retry comes with a new id. So past the caller's deadline (+5 s grace) a
/// connection whose interface is not in the NSE's netns is closed, as at
/// expiry: a DELETE, its addresses free again. One whose interface is there
/// stays.
#[tokio::test]
async fn a_connection_whose_interface_never_appears_is_closed_after_the_deadline() {
    if !nsm_tests::require_root("interface watch") {
        return;
    }
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "198.18.1.100/30")]).await;
    let (mut monitor, _) = nse.monitor(MonitorScopeSelector::default()).await;
    // The token lives 10 minutes: only the missing interface can close it.
    let md = || Metadata::expiring_in(Duration::from_secs(600), Some(Duration::from_secs(1)));
    let start = Instant::now();
    let (lost, _) = nse.request_with(req_p(), &md()).await.unwrap();
    next_event(&mut monitor).await.unwrap();
    let (built, _) = nse.request_with(req_p(), &md()).await.unwrap();
    next_event(&mut monitor).await.unwrap();
    let name = built
        .mechanism
        .as_ref()
        .and_then(|m| m.parameters.get("name"))
        .expect("the NSE names its interface")
        .clone();
    let netns = nse.netns.as_ref().expect("the NSE runs in its own netns");
    let out = std::process::Command::new("ip")
        .args(["-n", netns.name(), "link", "add", &name, "type", "veth"])
        .args(["peer", "name", "built-peer"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let ev = next_event_within(&mut monitor, Duration::from_secs(15))
        .await
        .expect("DELETE of the connection nobody built");
    let at = start.elapsed();
    assert_eq!(kind(&ev), ConnectionEventType::Delete);
    assert!(ev.connections.contains_key(&nse_segment(&lost).id));
    assert!(
        at >= Duration::from_secs(6),
        "closed after {at:?}, before the deadline + grace"
    );
    assert!(
        nse.log()
            .contains("no forwarder built this connection's interface"),
        "{}",
        nse.log()
    );
    // Its address is free again; the built one keeps its own.
    let (next, _) = nse.request_with(req_p(), &md()).await.unwrap();
    assert_eq!(ip(&next).dst_ip_addrs, ip(&lost).dst_ip_addrs);
    assert!(
        next_event_within(&mut monitor, Duration::from_secs(8))
            .await
            .is_some_and(|ev| kind(&ev) == ConnectionEventType::Update
                && ev.connections.contains_key(&nse_segment(&next).id)),
    );
    assert!(
        next_event_within(&mut monitor, Duration::from_secs(3))
            .await
            .is_none(),
        "the connection whose interface exists was closed too"
    );
}
