//! The endpoint's own proxy (`proxy.process`, shared placement) end to end:
//! the lab's clients (nsc-init → forwarder-plugin serve → mesh-proxy-nse)
//! reach the server through an HAProxy the endpoint started itself on a
//! port of its own (the lab's separate proxy listens elsewhere and sees
//! nothing); after kill -9 of that proxy, no request gets past it while it
//! restarts, and requests flow through it again once it is back.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use examples::lab::{Lab, LabConfig, NSE_UPLINK, server_addr};
use examples::nsc;
use examples::proxy::ProxyKind;
use examples::traffic::http_get;

const PORT: u16 = 15002;

fn managed_haproxy_pids(lab: &Lab) -> Vec<u32> {
    examples::inspect::pids_running(lab.nse_ns.name(), "managed.cfg")
}

#[test]
fn the_endpoints_own_proxy_carries_every_client_and_never_lets_one_past_it() {
    if !nsm_tests::require_root("managed proxy") {
        return;
    }
    if examples::proxy::haproxy_path().is_none() {
        assert!(!nsm_tests::in_ci(), "CI=true: haproxy is not installed");
        eprintln!("SKIPPED: haproxy is not installed");
        return;
    }
    let dir = std::env::temp_dir().join(nsm_tests::unique("managed-proxy"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("managed.cfg");
    std::fs::write(&cfg, examples::proxy::haproxy_config(&[PORT], 1337)).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "version: 1\nproxy:\n  port: {PORT}\n  process:\n    command: [haproxy, -db, -f, {}]\n    user: 1337\n    drainTimeout: 1s\n",
            cfg.display()
        ),
    )
    .unwrap();
    let lab = Lab::start(LabConfig {
        // The lab's own proxy (on 15001/15006) is not in anyone's path.
        proxy: ProxyKind::Builtin,
        nse_env: vec![("NSM_CONFIG".into(), config.display().to_string())],
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("lab: {e}"));

    // Two clients, both through the endpoint's proxy.
    let mut clients = Vec::new();
    for i in 0..2 {
        let client = lab.client().unwrap();
        let opts = lab.nsc_options(&format!("managed{i}")).unwrap();
        let (nsc, _up) = nsc::watch(
            &client,
            &opts,
            &lab.dir.join(&format!("nsc-{i}.log")),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("nsc-init: {e}{}", lab.logs()));
        lab.get_through_proxy(&client, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{e}"));
        clients.push((client, nsc));
    }
    assert!(
        lab.proxy_lines().is_empty(),
        "the lab's own proxy saw traffic: {:?}",
        lab.proxy_lines()
    );
    let first = managed_haproxy_pids(&lab);
    assert_eq!(first.len(), 1, "one shared proxy: {first:?}{}", lab.logs());

    // kill -9: while it is away requests fail; none reaches the server
    // from the client's own address; then they flow through it again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let client = &clients[0].0;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut failed_meanwhile = 0;
    loop {
        match http_get(client, server_addr(), Duration::from_secs(2)) {
            Ok(ex) => {
                assert_eq!(
                    ex.server_saw.ip(),
                    IpAddr::V4(NSE_UPLINK),
                    "a request got past the proxy while it restarted{}",
                    lab.logs()
                );
                let now = managed_haproxy_pids(&lab);
                if now.iter().any(|p| !first.contains(p)) {
                    break;
                }
            }
            Err(_) => failed_meanwhile += 1,
        }
        assert!(
            Instant::now() < deadline,
            "the proxy did not come back{}",
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("requests refused while the proxy restarted: {failed_meanwhile}");
    for (c, _) in &clients {
        lab.get_through_proxy(c, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("after the restart: {e}"));
    }
    drop(clients);
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}
