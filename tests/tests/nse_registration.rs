//! mesh-proxy-nse registering with NSM's registry (a fake one here, served
//! on a unix socket with grpcfd as nsmgr's is): services first, then the
//! endpoint with an `inode://` URL whose fd arrives beside the call and
//! dials the endpoint's socket; the `path` metadata and our token on every
//! call; re-registration before the returned expiration; Unregister on
//! SIGTERM when asked; retries while the registry is away.

mod nse_support;
mod registry_support;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use nse_support::*;
use nsm_api::inode::InodeUrl;
use registry_support::{Seen, start_registry};

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(nsm_tests::unique("reg"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_its_services_then_itself_by_fd_and_refreshes_before_expiry() {
    let dir = scratch();
    let registry = start_registry(&dir.join("nsm.io.sock"), Duration::from_secs(3));
    let connect_to = format!("unix://{}", dir.join("nsm.io.sock").display());
    let nse = Nse::start(&[
        ("NSM_CONNECT_TO", &connect_to),
        ("NSM_LABELS", "app:mesh"),
        ("NSM_SERVICE_NAMES", "mesh-proxy,other"),
        ("POD_NAME", "nse-0"),
        ("NSM_METRICS_LISTEN_ON", "127.0.0.1:9467"),
    ])
    .await;
    registry
        .wait_for("services and endpoint registered", WAIT, |s| {
            s.iter().any(|e| matches!(e, Seen::Endpoint { .. }))
        })
        .await;
    let seen = registry.seen();
    let services: Vec<(String, String)> = seen
        .iter()
        .filter_map(|s| match s {
            Seen::Service(ns) => Some((ns.name.clone(), ns.payload.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        services[..2],
        [
            ("mesh-proxy".into(), "IP".into()),
            ("other".into(), "IP".into())
        ],
        "the services come first, with their payload"
    );
    let Some(Seen::Endpoint {
        nse: reg,
        fd_inode,
        dialable,
        path_metadata,
        token,
        ..
    }) = registry.endpoints().first().cloned()
    else {
        unreachable!()
    };
    assert_eq!(reg.name, nse.name);
    assert_eq!(reg.network_service_names, ["mesh-proxy", "other"]);
    let labels = &reg.network_service_labels["mesh-proxy"].labels;
    assert_eq!(labels["app"], "mesh");
    assert_eq!(labels["podName"], "nse-0");
    let md = std::fs::metadata(&nse.socket).unwrap();
    let socket_inode = InodeUrl::new(md.dev(), md.ino());
    assert_eq!(
        reg.url,
        socket_inode.to_string(),
        "the URL names the socket file"
    );
    assert_eq!(
        fd_inode,
        Some(socket_inode),
        "the fd beside the call is the socket file"
    );
    assert!(
        dialable,
        "the registry can dial the endpoint through the fd"
    );
    assert!(
        path_metadata && token,
        "path metadata and our token on the call"
    );

    // 3 s expiry: refreshed at 2/3, so at least twice more within 5 s.
    registry
        .wait_for("refreshes before expiry", Duration::from_secs(5), |s| {
            s.iter()
                .filter(|e| matches!(e, Seen::Endpoint { .. }))
                .count()
                >= 3
        })
        .await;
    // Each registration and refresh is counted.
    let scrape = "exec 3<>/dev/tcp/127.0.0.1/9467 && printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3";
    let text = match &nse.netns {
        Some(ns) => ns.exec_ok(&["bash", "-c", scrape]),
        None => String::from_utf8(
            std::process::Command::new("bash")
                .args(["-c", scrape])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap(),
    };
    let ok = text.lines().find_map(|l| {
        l.strip_prefix(r#"nsm_endpoint_registrations_total{result="ok"} "#)
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    assert!(ok.is_some_and(|n| n >= 3.0), "{text}");
    drop(nse);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_while_the_registry_is_away_and_unregisters_on_sigterm() {
    let dir = scratch();
    let socket = dir.join("nsm.io.sock");
    let connect_to = format!("unix://{}", socket.display());
    let mut nse = Nse::start(&[
        ("NSM_CONNECT_TO", &connect_to),
        ("NSM_REGISTER_SERVICE", "false"),
        ("NSM_UNREGISTER_ITSELF", "true"),
    ])
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let registry = start_registry(&socket, Duration::from_secs(60));
    registry
        .wait_for(
            "registered once the registry is up",
            Duration::from_secs(8),
            |s| s.iter().any(|e| matches!(e, Seen::Endpoint { .. })),
        )
        .await;
    assert!(
        !registry
            .seen()
            .iter()
            .any(|s| matches!(s, Seen::Service(_))),
        "NSM_REGISTER_SERVICE=false registers no service"
    );
    let status = nse.child.terminate(WAIT).expect("exits on SIGTERM");
    assert!(status.success(), "{}", nse.log());
    let unregistered: Vec<String> = registry
        .seen()
        .iter()
        .filter_map(|s| match s {
            Seen::Unregister(e) => Some(e.name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(unregistered, [nse.name.clone()], "{}", nse.log());
    let _ = std::fs::remove_dir_all(&dir);
}
