//! A real third-party proxy behind the rules: HAProxy in the pod, running
//! as the proxy uid, listening on the outbound port and forwarding to each
//! connection's original destination (`server s 0.0.0.0:0` reads
//! SO_ORIGINAL_DST). The app's connection reaches the peer through it.

#[macro_use]
mod redirect_common;

use std::time::{Duration, Instant};

use nsm_tests::process::ChildGuard;
use nsm_tests::topology::{IdentityServer, PEER_V4, POD_V4, PodPeer, any, v4};
use redirect_common::{Kind, app, backend, plan};

const CONFIG: &str = "\
global
    uid 1337
    gid 1337
    maxconn 64
defaults
    mode tcp
    timeout connect 3s
    timeout client 5s
    timeout server 5s
frontend f
    bind :15001
    default_backend b
backend b
    server s 0.0.0.0:0
";

fn haproxy_forwards_to_the_original_destination(kind: Kind) {
    if !nsm_tests::require_root("haproxy_forwards_to_the_original_destination")
        || !nsm_tests::require_tool("haproxy_forwards_to_the_original_destination", "haproxy")
    {
        return;
    }
    let topo = PodPeer::new();
    let _peer = IdentityServer::tcp(&topo.peer_ns, any(false, 8080), "peer", false);
    let dst = v4(PEER_V4, 8080);
    backend(kind).apply(&topo.pod_ns, &plan("{}")).unwrap();
    // Captured, and nothing listens on 15001 yet.
    let refused = app().tcp(&topo.pod_ns, dst).unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );

    let dir = std::env::temp_dir().join(nsm_tests::unique("hap"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, CONFIG).unwrap();
    let mut cmd = topo.pod.command("haproxy");
    cmd.arg("-db").arg("-f").arg(&cfg);
    let _haproxy = ChildGuard::spawn(&mut cmd);

    // Wait until HAProxy listens (the first connection may be refused).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (reply, client) = loop {
        match app().tcp(&topo.pod_ns, dst) {
            Ok(ok) => break ok,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("no answer through haproxy: {e}"),
        }
    };
    assert_eq!(reply.label, "peer");
    assert_eq!(
        reply.local, dst,
        "haproxy connected to the original destination"
    );
    assert_eq!(reply.from.ip(), POD_V4);
    // A second connection, made by HAProxy (uid 1337, so not captured again).
    assert_ne!(
        reply.from, client,
        "the peer saw haproxy's connection, not the app's"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

per_backend!(haproxy_forwards_to_the_original_destination);
