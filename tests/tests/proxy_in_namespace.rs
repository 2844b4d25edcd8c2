//! forwarder_plugin::proxy in another namespace, what the injected
//! placement (issue 13) needs from the node agent: the proxy process lives
//! on our node but its sockets live in a pod's namespace, where it is also
//! probed; it runs as the proxy user, is started again after kill -9, and
//! is gone after stop.

use std::path::Path;
use std::time::Duration;

use forwarder_plugin::netns::Netns;
use forwarder_plugin::proxy::{ProcessSpec, ProxyState, Readiness, Supervisor};
use nsm_tests::netns::TestNetns;

fn netns_inode(pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|m| m.ino())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_in_a_pods_namespace_is_probed_there_restarted_and_stopped() {
    if !nsm_tests::require_root("proxy in a namespace") {
        return;
    }
    if !nsm_tests::require_tool("proxy in a namespace", "haproxy") {
        return;
    }
    let haproxy = examples::proxy::haproxy_path().expect("haproxy, found on PATH");
    let ns = TestNetns::new("pxyns");
    let dir = std::env::temp_dir().join(nsm_tests::unique("pxyns"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, examples::proxy::haproxy_config(&[15001], 1337)).unwrap();
    let spec = ProcessSpec {
        argv: vec![
            haproxy.display().to_string(),
            "-db".into(),
            "-f".into(),
            cfg.display().to_string(),
        ],
        env: Default::default(),
        uid: Some(1337),
        gid: Some(1337),
        ready: Readiness::Tcp(15001),
        start_timeout: Duration::from_secs(5),
        drain_timeout: Duration::from_secs(1),
        stop_signal: nix::sys::signal::Signal::SIGTERM,
        limits: Default::default(),
    };
    let pod = Netns::open_path(Path::new(&ns.path())).unwrap();
    let pod_inode = pod.id().inode_url().to_string();
    let starts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = starts.clone();
    let proxy = Supervisor::start_in(
        spec,
        Some(pod),
        Box::new(move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }),
    );
    let first = proxy
        .ready(Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let inode = netns_inode(first).unwrap();
    assert!(
        pod_inode.ends_with(&format!("/{inode}")),
        "the proxy's sockets live in the pod's namespace ({pod_inode}), not {inode}"
    );
    assert_eq!(
        examples::inspect::uid(first),
        Some(1337),
        "as the proxy user"
    );
    // Listening there, where the pod's redirect rules send traffic.
    ns.exec_ok(&["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/15001"]);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut second = None;
    for _ in 0..100 {
        if let ProxyState::Ready { pid } = proxy.state()
            && pid != first
        {
            second = Some(pid);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = second.unwrap_or_else(|| panic!("not restarted: {:?}", proxy.state()));
    assert_eq!(
        netns_inode(second),
        Some(inode),
        "restarted in the pod's namespace"
    );
    assert_eq!(starts.load(std::sync::atomic::Ordering::Relaxed), 2);

    tokio::task::spawn_blocking(move || proxy.stop())
        .await
        .unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{second}")).exists()
            || std::fs::read_to_string(format!("/proc/{second}/stat"))
                .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'))),
        "stopped"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
