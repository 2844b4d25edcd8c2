//! `forwarder-plugin serve` as deploy/base/forwarder-plugin/forwarder.yaml runs it: the manifest's
//! environment (read from the file, host paths moved into a scratch
//! directory) starts it — its SVID from SPIRE's socket, here a Workload API
//! server on go-spiffe — NSM_CONNECT_TO is its next hop and its registry,
//! and it registers over mTLS the way NSM's forwarders do — service
//! `forwarder`, labels `p2p:true` plus the node's name, its socket by fd,
//! a token for the registry — so nsmgr can pick it.

mod registry_support;

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use examples::svid::TestCa;
use nsm_api::inode::InodeUrl;
use nsm_api::tls::Identity;
use nsm_tests::process::{ChildGuard, bin};
use registry_support::{Seen, start_registry_with};

const WAIT: Duration = Duration::from_secs(10);

/// `(name, value)` of the forwarder container's env in deploy/base/forwarder-plugin/forwarder.yaml,
/// `valueFrom` fields given `from`, `$(VAR)` expanded as Kubernetes does.
fn manifest_env(from: &[(&str, &str)]) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/base/forwarder-plugin/forwarder.yaml"),
    )
    .unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let env = doc["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .expect("the forwarder container has env")
        .clone();
    let mut out: Vec<(String, String)> = Vec::new();
    for e in env {
        let name = e["name"].as_str().unwrap().to_owned();
        let mut value = match e["value"].as_str() {
            Some(v) => v.to_owned(),
            None => from
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
                .unwrap_or_else(|| panic!("no value for {name} (valueFrom)")),
        };
        for (k, v) in &out {
            value = value.replace(&format!("$({k})"), v);
        }
        out.push((name, value));
    }
    out
}

/// The go-spiffe Workload API server of tests/workload_api.rs on `socket`,
/// serving the SVID files in `dir`; `None` (skipped) where it is not built
/// outside CI.
fn workload_api(socket: &std::path::Path, dir: &std::path::Path) -> Option<ChildGuard> {
    let bin = nsm_tests::go_bin("spiffe-workload-api-fake", "tests/go/workload-api")?;
    let mut cmd = Command::new(bin);
    cmd.args(["-socket", socket.to_str()?, "-dir", dir.to_str()?])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = ChildGuard::spawn(&mut cmd);
    let end = Instant::now() + WAIT;
    while !socket.exists() {
        assert!(Instant::now() < end, "the Workload API did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_with_the_manifests_environment_and_registers_as_nsm_forwarders_do() {
    if !nsm_tests::require_root("forwarder_registration") {
        return;
    }
    let dir = std::env::temp_dir().join(nsm_tests::unique("fwdreg"));
    std::fs::create_dir_all(&dir).unwrap();
    let env = manifest_env(&[("NODE_NAME", "node-a")]);
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    for var in [
        "NSM_NAME",
        "NSM_LISTEN_ON",
        "NSM_CONNECT_TO",
        "SPIFFE_ENDPOINT_SOCKET",
    ] {
        assert!(names.contains(&var), "the manifest sets {var}: {names:?}");
    }
    // Host paths (nsmgr's socket, ours, SPIRE's) into the scratch directory.
    let moved = |v: &str| {
        let file = v.rsplit('/').next().unwrap();
        format!("unix://{}", dir.join(file).display())
    };
    let ca = TestCa::new("k8s.nsm").unwrap();
    let svids = dir.join("svids");
    std::fs::create_dir_all(&svids).unwrap();
    ca.write(
        &ca.issue("/ns/nsm-system/pod/forwarder-plugin-node-a")
            .unwrap(),
        &svids,
    )
    .unwrap();
    let Some(_agent) = workload_api(&dir.join("agent.sock"), &svids) else {
        return;
    };
    let nsmgr = Identity::new(
        ca.material(&ca.issue("/ns/nsm-system/pod/nsmgr").unwrap())
            .unwrap(),
    );
    let registry = start_registry_with(
        &dir.join("nsm.io.sock"),
        Duration::from_secs(60),
        Some(nsmgr),
    );
    // `forwarder-plugin serve` with the manifest's environment, host paths moved.
    let serve = |extra: &[&str]| {
        let mut cmd = Command::new(bin("forwarder-plugin"));
        cmd.arg("serve")
            .args(["--state-dir", dir.join("state").to_str().unwrap()])
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in &env {
            match k.as_str() {
                "NSM_LISTEN_ON" | "NSM_CONNECT_TO" | "SPIFFE_ENDPOINT_SOCKET" => {
                    cmd.env(k, moved(v))
                }
                // The pod's port, on this host's loopback only (and a free port).
                "NSM_METRICS_LISTEN_ON" => cmd.env(k, "127.0.0.1:0"),
                _ => cmd.env(k, v),
            };
        }
        cmd
    };
    let mut cmd = serve(&[]);
    let log = dir.join("fwd.log");
    cmd.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = ChildGuard::spawn(&mut cmd);
    let listen = dir.join("forwarder.sock");
    let end = Instant::now() + WAIT;
    while !listen.exists() {
        if let Ok(Some(st)) = child.0.try_wait() {
            panic!(
                "forwarder-plugin exited with {st}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < end, "no socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    registry
        .wait_for("the forwarder registered", WAIT, |s| {
            s.iter().any(|e| matches!(e, Seen::Endpoint { .. }))
        })
        .await;
    let Some(Seen::Endpoint {
        nse,
        fd_inode,
        dialable,
        peer,
        claims,
        ..
    }) = registry.endpoints().first().cloned()
    else {
        unreachable!()
    };
    assert_eq!(nse.name, "forwarder-plugin-node-a");
    assert_eq!(nse.network_service_names, ["forwarder"]);
    let labels = &nse.network_service_labels["forwarder"].labels;
    assert_eq!(labels["p2p"], "true");
    assert_eq!(labels["nodeName"], "node-a");
    let md = std::fs::metadata(&listen).unwrap();
    assert_eq!(fd_inode, Some(InodeUrl::new(md.dev(), md.ino())));
    assert!(dialable, "nsmgr can dial the forwarder through the fd");
    let me = "spiffe://k8s.nsm/ns/nsm-system/pod/forwarder-plugin-node-a".to_owned();
    assert_eq!(
        peer.as_ref(),
        Some(&me),
        "mTLS with the Workload API's SVID"
    );
    assert_eq!(
        claims,
        Some((
            me,
            vec!["spiffe://k8s.nsm/ns/nsm-system/pod/nsmgr".to_owned()]
        )),
        "its token, for the registry"
    );
    // The manifest's exec probe, in the same environment: SERVING, over
    // mTLS with the Workload API's SVID.
    let probe = serve(&["--probe"]).output().unwrap();
    assert!(
        probe.status.success(),
        "forwarder-plugin serve --probe: {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    assert!(child.terminate(WAIT).is_some_and(|s| s.success()));
    let probe = serve(&["--probe"]).output().unwrap();
    assert_eq!(probe.status.code(), Some(1), "nothing serves any more");
    let _ = std::fs::remove_dir_all(&dir);
}
