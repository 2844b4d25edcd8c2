//! The endpoint's own proxy (`proxy.process`, shared placement) end to end:
//! the lab's clients (nsc-init → forwarder-plugin serve → mesh-proxy-nse)
//! reach the server through an HAProxy the endpoint started itself on a
//! port of its own (the lab's separate proxy listens elsewhere and sees
//! nothing); after kill -9 of that proxy, no request gets past it while it
//! restarts, and requests flow through it again once it is back. A changed
//! definition in NSM_CONFIG is upgraded to without dropping traffic: the
//! new proxy on the other port takes new connections while an open one
//! drains through the old; a definition that cannot start leaves the
//! running proxy in place; a restarted endpoint adopts the upgraded one.

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
    if !nsm_tests::require_tool("managed proxy", "haproxy") {
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

/// Writes the endpoint's config whole (aside, then renamed, as a ConfigMap
/// update is): a proxy on the template's port, `version` in its
/// environment, drained on SIGUSR1 (HAProxy's soft stop); `program` runs it.
fn upgradable_config(dir: &std::path::Path, version: u32, program: &str) -> std::path::PathBuf {
    let cfg = dir.join("managed.cfg");
    let text = examples::proxy::haproxy_config(&[PORT], 1337).replace(
        &format!("    bind :{PORT}\n"),
        "    bind \":${PROXY_PORT}\"\n",
    );
    std::fs::write(&cfg, text).unwrap();
    let config = dir.join("config.yaml");
    let tmp = dir.join("config.yaml.new");
    std::fs::write(
        &tmp,
        format!(
            "version: 1\nproxy:\n  port: {PORT}\n  process:\n    command: [{program}, -db, -f, {}]\n    env: {{PROXY_PORT: '{{{{proxyPort}}}}', VERSION: '{version}'}}\n    user: 1337\n    stopSignal: SIGUSR1\n    drainTimeout: 30s\n",
            cfg.display()
        ),
    )
    .unwrap();
    std::fs::rename(&tmp, &config).unwrap();
    config
}

#[test]
fn an_upgrade_of_the_endpoints_proxy_moves_new_connections_while_open_ones_drain() {
    if !nsm_tests::require_root("managed proxy upgrade") {
        return;
    }
    if !nsm_tests::require_tool("managed proxy upgrade", "haproxy") {
        return;
    }
    const UP: Duration = Duration::from_secs(30);
    const IO: Duration = Duration::from_secs(5);
    let shifted = PORT + forwarder_plugin::proxy::UPGRADE_PORT_SHIFT;
    let dir = std::env::temp_dir().join(nsm_tests::unique("managed-upgrade"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = upgradable_config(&dir, 1, "haproxy");
    let mut lab = Lab::start(LabConfig {
        proxy: ProxyKind::Builtin,
        nse_env: vec![("NSM_CONFIG".into(), config.display().to_string())],
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("lab: {e}"));
    let client = lab.client().unwrap();
    let opts = lab.nsc_options("upgrade").unwrap();
    let (_nsc, _up) = nsc::watch(&client, &opts, &lab.dir.join("nsc.log"), UP)
        .unwrap_or_else(|e| panic!("nsc-init: {e}{}", lab.logs()));
    lab.get_through_proxy(&client, IO)
        .unwrap_or_else(|e| panic!("{e}"));
    let old = managed_haproxy_pids(&lab);
    assert_eq!(old.len(), 1, "{old:?}{}", lab.logs());
    assert!(examples::proxy::listening(old[0], PORT));

    // A long-lived connection through the first proxy.
    let mut held = lab.hold(&client, 9090).unwrap();
    assert_eq!(held.peer.ip(), IpAddr::V4(NSE_UPLINK), "through the proxy");
    held.echo(b"before").unwrap();

    // The definition changes: the endpoint reads its config again, starts
    // the new proxy on the other port, moves its rules there in one
    // transaction and lets the old one drain.
    upgradable_config(&dir, 2, "haproxy");
    let nse = lab.nse().unwrap();
    let upgraded = nse.wait_for_line("the upgrade", UP, |l| l.contains("proxy upgraded"));
    assert!(upgraded.is_ok(), "{upgraded:?}{}", lab.logs());
    let now = managed_haproxy_pids(&lab);
    let new: Vec<u32> = now.iter().copied().filter(|p| !old.contains(p)).collect();
    assert_eq!(
        new.len(),
        1,
        "one new proxy beside the draining one: {now:?}"
    );
    assert!(
        examples::inspect::environ(new[0]).contains(&"VERSION=2".to_owned()),
        "the new definition runs"
    );
    assert!(
        examples::proxy::listening(new[0], shifted),
        "the new proxy listens on {shifted}"
    );
    assert!(
        nsm_tests::eventually(IO, || !examples::proxy::listening(old[0], PORT)),
        "the old proxy stopped listening (draining)"
    );

    // New connections go through the new proxy (the only one listening);
    // the open one still flows through the old one, which is alive.
    lab.get_through_proxy(&client, IO)
        .unwrap_or_else(|e| panic!("after the upgrade: {e}"));
    held.echo(b"during the drain").unwrap();
    assert!(
        std::path::Path::new(&format!("/proc/{}", old[0])).exists(),
        "the old proxy drains"
    );
    drop(held);
    assert!(
        nsm_tests::eventually(Duration::from_secs(10), || managed_haproxy_pids(&lab)
            == new),
        "the old proxy exited once drained: {:?}",
        managed_haproxy_pids(&lab)
    );

    // A definition whose proxy cannot start: the running one stays.
    let from = lab.nse().unwrap().log().len();
    upgradable_config(&dir, 3, "/nonexistent/haproxy");
    let kept = lab
        .nse()
        .unwrap()
        .wait_until("the failed upgrade", UP, |p| {
            p.log()[from..]
                .contains("the upgraded proxy is not ready: the running one stays")
                .then_some(())
        });
    assert!(kept.is_ok(), "{kept:?}{}", lab.logs());
    assert_eq!(managed_haproxy_pids(&lab), new, "the running proxy stays");
    lab.get_through_proxy(&client, IO)
        .unwrap_or_else(|e| panic!("after a failed upgrade: {e}"));
    // Back to the definition that runs: nothing to upgrade.
    upgradable_config(&dir, 2, "haproxy");

    // kill -9 of the endpoint: the restarted one adopts the upgraded proxy
    // (the one its rules lead to), and traffic never meets a closed port.
    let nse = lab.nse().unwrap();
    nse.signal(nix::sys::signal::Signal::SIGKILL);
    nse.wait(UP).unwrap();
    let from = nse.log().len();
    lab.start_nse().unwrap_or_else(|e| panic!("{e}"));
    let adopted = lab.nse().unwrap().wait_until("adoption", UP, |p| {
        p.log()[from..]
            .contains("adopted the proxy an earlier run started")
            .then_some(())
    });
    assert!(adopted.is_ok(), "{adopted:?}{}", lab.logs());
    assert_eq!(managed_haproxy_pids(&lab), new, "the same proxy, adopted");
    lab.get_through_proxy(&client, IO)
        .unwrap_or_else(|e| panic!("after the endpoint's restart: {e}"));
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}
