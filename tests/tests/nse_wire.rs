//! mesh-proxy-nse as a forwarder sees it on the wire (nsm-wire.md §9, cases
//! 5–7 and 12–15): health, the returned path and tokens, the KERNEL
//! mechanism and the netns fd that comes with it, and what is refused.
//! No root needed: the NSE hands out its own netns.

mod nse_support;

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nse_support::*;
use nsm_api::connection::MonitorScopeSelector;
use nsm_api::path::{from_timestamp, to_timestamp};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test]
async fn health_is_serving_for_both_nsm_services() {
    let nse = Nse::start(&[]).await;
    for svc in [
        "networkservice.NetworkService",
        "connection.MonitorConnection",
    ] {
        assert_eq!(
            nse.health(svc).await.unwrap(),
            ServingStatus::Serving,
            "{svc}"
        );
    }
    let unknown = nse.health("no.such.Service").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn request_returns_nsm_path_with_tokens_and_expiry() {
    let nse = Nse::start(&[("NSM_MAX_TOKEN_LIFETIME", "2m")]).await;
    let req = req_p();
    let sent = conn_of(&req).clone();
    let md = Metadata::forwarder();
    let before = SystemTime::now();
    let (conn, _) = nse.request_with(req.clone(), &md).await.expect("Request");

    assert_eq!(conn.state, nsm_api::connection::State::Up as i32);
    assert_eq!(conn.id, sent.id, "the caller's id comes back");
    let path = conn.path.as_ref().unwrap();
    assert_eq!(path.index, 2);
    assert_eq!(path.path_segments.len(), 4);
    let (got, want) = (segments(&conn), segments(&sent));
    for i in 0..2 {
        assert_eq!(got[i], want[i], "segment {i} is unchanged");
    }
    // The forwarder's segment carries its per-RPC token from the metadata.
    assert_eq!(
        (got[2].name.as_str(), got[2].id.as_str()),
        ("fwd", sent.id.as_str())
    );
    assert_eq!(Some(&got[2].token), md.token.as_ref());
    assert_eq!(got[2].expires, Some(to_timestamp(md.expires_at.unwrap())));

    // Our segment: our name, a fresh id, an ES256 JWT whose exp is `expires`, within the lifetime.
    let own = &got[3];
    assert_eq!(own.name, nse.name);
    assert!(!own.id.is_empty() && own.id != sent.id);
    let jwt =
        jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(&own.token).expect("a JWT");
    assert_eq!(jwt.header.alg, jsonwebtoken::Algorithm::ES256);
    assert_eq!(jwt.claims["sub"], nse.name.as_str());
    let exp = UNIX_EPOCH + Duration::from_secs(jwt.claims["exp"].as_u64().expect("exp"));
    let expires = from_timestamp(own.expires.as_ref().expect("expires")).unwrap();
    let skew = expires.duration_since(exp).unwrap_or_else(|e| e.duration());
    assert!(
        skew < Duration::from_secs(1),
        "expires {expires:?} vs exp {exp:?}"
    );
    assert!(
        expires <= SystemTime::now() + Duration::from_secs(120),
        "beyond NSM_MAX_TOKEN_LIFETIME"
    );
    assert!(
        expires >= before + Duration::from_secs(118),
        "far shorter than NSM_MAX_TOKEN_LIFETIME"
    );

    // Every request gets its own segment id.
    let (other, _) = nse.request(req_p()).await.unwrap();
    assert_ne!(nse_segment(&other).id, own.id);
}

#[tokio::test]
async fn kernel_mechanism_comes_with_the_nse_netns_fd() {
    let nse = Nse::start(&[]).await;
    let (conn, fds) = nse.request(req_p()).await.expect("Request");
    let m = conn.mechanism.as_ref().expect("mechanism");
    assert_eq!(
        (m.cls.as_str(), m.r#type.as_str()),
        ("LOCAL", "KERNEL"),
        "first supported preference"
    );
    let name = &m.parameters["name"];
    assert!(!name.is_empty() && name.len() <= 15, "{name:?}");
    assert!(
        name.starts_with("mesh-proxy-"),
        "<service[:10]>-<random>: {name:?}"
    );
    assert_eq!(
        nse_segment(&conn).metrics["server_interface"],
        format!("KERNEL/{name}")
    );

    // The fd arrived on the same connection and is that inode...
    let (url, fd) = received_netns(&fds, &conn).await;
    // ...and it is a network namespace: the NSE's own.
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    let link = link.to_string_lossy();
    assert!(link.starts_with("net:["), "{link}");
    assert_eq!(link, format!("net:[{}]", url.ino));
    let nse_ns = std::fs::metadata(format!("/proc/{}/ns/net", nse.pid())).unwrap();
    assert_eq!((nse_ns.dev(), nse_ns.ino()), (url.dev, url.ino));
}

#[tokio::test]
async fn close_sends_the_netns_fd_again() {
    let nse = Nse::start(&[]).await;
    let (conn, _) = nse.request(req_p()).await.unwrap();
    let url: nsm_api::inode::InodeUrl = conn.mechanism.as_ref().unwrap().parameters["inodeURL"]
        .parse()
        .unwrap();
    let fds = nse.close(conn).await.expect("Close");
    let fd = fds
        .recv_fd(&url, WAIT)
        .await
        .expect("netns fd with the Close response");
    assert_eq!(
        nsm_api::grpcfd::inode_url_of(std::os::fd::AsFd::as_fd(&fd)).unwrap(),
        url
    );
}

#[tokio::test]
async fn unsupported_mechanisms_are_refused_and_nothing_is_allocated() {
    let nse = Nse::start(&[("NSM_CIDR_PREFIX", "198.18.1.100/31")]).await;
    let (mut monitor, _) = nse.monitor(MonitorScopeSelector::default()).await;

    let mut memif_only = req_p();
    memif_only.mechanism_preferences = vec![mechanism("MEMIF")];
    let e = nse.request(memif_only).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("cannot support any of the requested mechanisms: MEMIF"),
        "{}",
        e.message()
    );

    let mut nothing = req_p();
    nothing.mechanism_preferences.clear();
    let e = nse.request(nothing).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("cannot support any of the requested mechanisms"),
        "{}",
        e.message()
    );

    let mut preset_memif = req_p();
    conn_mut(&mut preset_memif).mechanism = Some(mechanism("MEMIF"));
    let e = nse.request(preset_memif).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("unsupported mechanism \"MEMIF\""),
        "{}",
        e.message()
    );

    // The only pair of the /31 is still free, and no event was sent for the refused ones.
    let (ok, _) = nse.request(req_p()).await.unwrap();
    assert_eq!(ip(&ok).dst_ip_addrs, ["198.18.1.100/32"]);
    let ev = next_event(&mut monitor).await.unwrap();
    assert_eq!(
        ev.r#type,
        nsm_api::connection::ConnectionEventType::Update as i32
    );
    assert!(ev.connections.contains_key(&nse_segment(&ok).id));
}

#[tokio::test]
async fn preset_kernel_mechanism_keeps_its_name() {
    let nse = Nse::start(&[]).await;
    let mut req = req_p();
    let mut k = mechanism("KERNEL");
    k.parameters.insert("name".into(), "foo".into());
    conn_mut(&mut req).mechanism = Some(k);
    let (conn, fds) = nse.request(req).await.expect("Request");
    let m = conn.mechanism.as_ref().unwrap();
    assert_eq!(m.parameters["name"], "foo");
    assert_eq!(nse_segment(&conn).metrics["server_interface"], "KERNEL/foo");
    received_netns(&fds, &conn).await;
}

#[tokio::test]
async fn invalid_paths_are_refused_without_state() {
    let nse = Nse::start(&[]).await;

    let mut out_of_range = req_p();
    conn_mut(&mut out_of_range).path.as_mut().unwrap().index = 3;
    let e = nse.request(out_of_range).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("connection.path.index 3 is out of range: path has 3 segments"),
        "{}",
        e.message()
    );

    let mut mismatch = req_p();
    conn_mut(&mut mismatch).id = "not-f2".into();
    let e = nse.request(mismatch).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains(
            "connection.id \"not-f2\" does not match connection.path.path_segments[2].id"
        ),
        "{}",
        e.message()
    );

    let (_, state) = nse.monitor(MonitorScopeSelector::default()).await;
    assert!(
        state.connections.is_empty(),
        "{:?}",
        state.connections.keys()
    );
}

#[tokio::test]
async fn previous_segment_needs_expires() {
    let nse = Nse::start(&[]).await;
    // No token metadata and no expires in the forwarder's segment: nothing says when to expire.
    let mut req = req_p();
    conn_mut(&mut req).path.as_mut().unwrap().path_segments[2].expires = None;
    let e = nse
        .request_with(req.clone(), &Metadata::none())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message()
            .contains("path_segments[2] (\"fwd\") has no expires"),
        "{}",
        e.message()
    );

    // The metadata supplies it (as NSM forwarders do)...
    nse.request_with(req, &Metadata::forwarder())
        .await
        .expect("expires from metadata");
    // ...or the segment already has it.
    nse.request_with(req_p(), &Metadata::none())
        .await
        .expect("expires in the path");
}

#[tokio::test]
async fn tcp_listener_serves_the_same_api_without_fd_passing() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // The test's own namespace (TCP must reach it): placement sidecar, and
    // as root without CAP_NET_ADMIN (setpriv), so the NSE cannot touch this
    // namespace's firewall, not even to clean up at start.
    let dir = TempDir::new();
    let config = dir.path().join("sidecar.yaml");
    std::fs::write(&config, "placement: sidecar\n").unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let program = nsm_tests::process::bin("mesh-proxy-nse");
    let mut cmd = if is_root() {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&program);
        c
    } else {
        std::process::Command::new(&program)
    };
    cmd.env_clear()
        .env("NSM_INSECURE", "true")
        .env("NSM_CONFIG", &config)
        .env("NSM_LISTEN_ON", format!("tcp://127.0.0.1:{port}"))
        .env("NSM_CIDR_PREFIX", "198.18.1.100/31")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _nse = nsm_tests::process::ChildGuard::spawn(&mut cmd);
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let channel = loop {
        match endpoint.connect().await {
            Ok(ch) => break ch,
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "NSE not listening on TCP: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut client =
        nsm_api::networkservice::network_service_client::NetworkServiceClient::new(channel);
    // Placement sidecar asks for a forwarder that applies client rules.
    let mut req = req_p();
    forwarder_plugin::hop::announce_features(conn_mut(&mut req));
    let conn = client
        .request(Metadata::forwarder().wrap(req))
        .await
        .expect("Request over TCP")
        .into_inner();
    assert_eq!(conn.mechanism.as_ref().unwrap().r#type, "KERNEL");
    assert_eq!(ip(&conn).dst_ip_addrs, ["198.18.1.100/32"]);
    client
        .close(Metadata::forwarder().wrap(conn))
        .await
        .expect("Close over TCP");
}

#[tokio::test]
async fn our_segment_is_reused_and_later_segments_are_trimmed() {
    let nse = Nse::start(&[]).await;
    let mut req = req_p();
    let segs = &mut conn_mut(&mut req).path.as_mut().unwrap().path_segments;
    segs.push(nsm_api::connection::PathSegment {
        name: nse.name.clone(),
        id: "kept-id".into(),
        ..Default::default()
    });
    segs.push(nsm_api::connection::PathSegment {
        name: "beyond".into(),
        id: "stale".into(),
        ..Default::default()
    });
    let (conn, _) = nse.request(req).await.expect("Request");
    let got = segments(&conn);
    assert_eq!(got.len(), 4, "the path ends at our segment: {got:?}");
    assert_eq!(
        (got[3].name.as_str(), got[3].id.as_str()),
        (nse.name.as_str(), "kept-id")
    );

    // A segment after the forwarder's with another name is ours from now on, with a new id.
    let mut req = req_p();
    conn_mut(&mut req)
        .path
        .as_mut()
        .unwrap()
        .path_segments
        .push(nsm_api::connection::PathSegment {
            name: "some-other-nse".into(),
            id: "their-id".into(),
            ..Default::default()
        });
    let (conn, _) = nse.request(req).await.expect("Request");
    let own = nse_segment(&conn);
    assert_eq!(own.name, nse.name);
    assert_ne!(own.id, "their-id");
}
