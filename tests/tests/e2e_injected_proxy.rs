//! Placement sidecar with an injected proxy, end to end: the endpoint names
//! the node agent's proxy (`sidecarProxy: haproxy`), and `forwarder-plugin
//! serve --proxies` starts that HAProxy inside the client's namespace as
//! uid 1337 — a process of the node, sockets of the pod — before nsc-init
//! returns, so the client's first connection already goes through it. A
//! crash restarts it while its rules make traffic wait; Close, a dead pod
//! and a bad definition leave nothing behind; a restarted node agent
//! adopts the proxies that kept running (upgrading those whose definition
//! changed meanwhile) instead of starting duplicates.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use examples::inspect::{self, NsState};
use examples::lab::{Lab, LabConfig, STATIC_CLIENT_IP, server_addr};
use examples::namespace::Namespace;
use examples::nsc;
use examples::proxy::ProxyKind;
use examples::traffic::http_get;
use nix::sys::signal::Signal;

const UP: Duration = Duration::from_secs(30);
// Generous: a loaded CI machine runs the suites beside each other.
const IO: Duration = Duration::from_secs(10);
const CFG: &str = "injected.cfg";

/// The HAProxy config and the node agent's proxies file in `dir`, with
/// `command` as the definition's command (`None`: HAProxy on that config).
fn proxies_file(dir: &Path, command: Option<&str>) -> PathBuf {
    let cfg = dir.join(CFG);
    std::fs::write(&cfg, examples::proxy::haproxy_config(&[15001, 15006], 1337)).unwrap();
    let command = command
        .map(str::to_owned)
        .unwrap_or_else(|| format!("[haproxy, -db, -f, {}]", cfg.display()));
    let file = dir.join("proxies.yaml");
    std::fs::write(
        &file,
        format!(
            "version: 1\nproxies:\n  haproxy:\n    command: {command}\n    env: {{MESH_CONNECTION: '{{{{connectionId}}}}', MESH_IF: '{{{{interface}}}}', MESH_POD: '{{{{labels.podName}}}}'}}\n    user: 1337\n    startTimeout: 5s\n    drainTimeout: 1s\n"
        ),
    )
    .unwrap();
    file
}

/// A lab whose endpoint puts every client in placement sidecar with the
/// node agent's proxy `sidecar_proxy`, and whose forwarder has `proxies`.
fn lab(dir: &Path, proxies: &Path, sidecar_proxy: &str) -> Option<Lab> {
    lab_with(dir, proxies, sidecar_proxy, &[])
}

fn lab_with(dir: &Path, proxies: &Path, sidecar_proxy: &str, args: &[&str]) -> Option<Lab> {
    if !nsm_tests::require_root("injected proxy") {
        return None;
    }
    if !nsm_tests::require_tool("injected proxy", "haproxy") {
        return None;
    }
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!("version: 1\nplacement: sidecar\nsidecarProxy: {sidecar_proxy}\n"),
    )
    .unwrap();
    Some(
        Lab::start(LabConfig {
            // The lab's own proxy beside the endpoint is in nobody's path.
            proxy: ProxyKind::Builtin,
            log_level: std::env::var("MP_LOG_LEVEL").unwrap_or_else(|_| "INFO".into()),
            nse_env: vec![("NSM_CONFIG".into(), config.display().to_string())],
            forwarder_args: ["--proxies", &proxies.display().to_string()]
                .into_iter()
                .chain(args.iter().copied())
                .map(str::to_owned)
                .collect(),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("lab: {e}")),
    )
}

fn snapshot(ns: &Namespace) -> NsState {
    inspect::snapshot(ns).unwrap_or_else(|e| panic!("{e}"))
}

fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(nsm_tests::unique(name));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The pids of processes in `ns` whose command line mentions our config.
fn proxies_in(ns: &Namespace) -> Vec<u32> {
    inspect::pids_running(ns.name(), CFG)
}

/// A request from `client` went through its own proxy: the server saw a
/// connection from the client's own address (the pod network) that is not
/// the app's (the proxy's), and the endpoint's proxy saw nothing of it.
fn assert_through_the_injected_proxy(lab: &Lab, client: &Namespace) {
    let ex = http_get(client, server_addr(), IO)
        .unwrap_or_else(|e| panic!("request through the injected proxy: {e}{}", lab.logs()));
    assert_eq!(ex.server_saw.ip(), IpAddr::V4(STATIC_CLIENT_IP));
    assert_ne!(
        ex.server_saw, ex.local,
        "the server saw the proxy's connection, not the app's"
    );
    assert_eq!(lab.proxy_saw(ex.local), None);
}

#[test]
fn the_injected_proxy_is_ready_before_nsc_init_returns_restarts_and_goes_with_close() {
    let dir = workdir("injected");
    let file = proxies_file(&dir, None);
    let Some(lab) = lab(&dir, &file, "haproxy") else {
        return;
    };
    let client = lab.client().unwrap();
    lab.attach_static_client(&client).unwrap();
    let before = snapshot(&client);
    let mut opts = lab.nsc_options("injected").unwrap();
    // nsc-init labels its connection with the pod's name, as NSM's does.
    opts.env.push(("POD_NAME".into(), "web-0".into()));
    let (mut nsc, up) = nsc::watch(&client, &opts, &lab.dir.join("nsc.log"), UP)
        .unwrap_or_else(|e| panic!("nsc-init: {e}{}", lab.logs()));

    // Ready as nsc-init returns: already there, listening, as uid 1337,
    // with the connection's values in its environment.
    let pids = proxies_in(&client);
    assert_eq!(
        pids.len(),
        1,
        "one proxy in the client: {pids:?}{}",
        lab.logs()
    );
    let first = pids[0];
    assert_eq!(
        inspect::uid(first),
        Some(1337),
        "the proxy runs as the proxy uid"
    );
    let env = inspect::environ(first);
    assert!(
        env.contains(&format!("MESH_IF={}", up.iface)),
        "the template had the client's interface: {env:?}"
    );
    assert!(
        env.contains(&"MESH_POD=web-0".to_owned()),
        "the template had the connection's label podName: {env:?}"
    );
    let conn = env
        .iter()
        .find_map(|v| v.strip_prefix("MESH_CONNECTION="))
        .unwrap_or_else(|| panic!("no MESH_CONNECTION in {env:?}"));
    assert!(
        !conn.is_empty() && lab.logs().contains(conn),
        "the template had the connection's id {conn:?}"
    );
    assert_through_the_injected_proxy(&lab, &client);

    // kill -9: restarted in the client's namespace; meanwhile no request
    // bypasses it (a bypass would reach the server as the app's own connection).
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    let mut refused = 0;
    let back = nsm_tests::eventually(Duration::from_secs(15), || {
        match http_get(&client, server_addr(), Duration::from_secs(1)) {
            Ok(ex) => assert_ne!(
                ex.server_saw,
                ex.local,
                "a request bypassed the proxy while it restarted{}",
                lab.logs()
            ),
            Err(_) => refused += 1,
        }
        proxies_in(&client).iter().any(|p| *p != first)
    });
    assert!(back, "the proxy came back{}", lab.logs());
    eprintln!("requests refused while the injected proxy restarted: {refused}");
    assert!(
        nsm_tests::eventually(Duration::from_secs(5), || http_get(
            &client,
            server_addr(),
            IO
        )
        .is_ok()),
        "requests flow again{}",
        lab.logs()
    );
    assert_through_the_injected_proxy(&lab, &client);

    // Close: the proxy drained and gone, the client as before.
    let status = nsc.terminate(UP).unwrap();
    assert!(status.success(), "{status}: {}", nsc.tail());
    assert_eq!(
        proxies_in(&client),
        Vec::<u32>::new(),
        "no proxy after Close"
    );
    assert_eq!(
        before.diff(&snapshot(&client)),
        Vec::<String>::new(),
        "Close removed the client's rules and link"
    );
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_proxy_that_never_gets_ready_or_is_not_defined_fails_the_request_and_leaves_nothing() {
    let dir = workdir("injected-bad");
    // Exits at once, saying why.
    let file = proxies_file(
        &dir,
        Some("[sh, -c, 'echo cannot bind 15001: config broken >&2; exit 3']"),
    );
    let Some(lab) = lab(&dir, &file, "haproxy") else {
        return;
    };
    let client = lab.client().unwrap();
    let (before, nse_before) = (snapshot(&client), snapshot(&lab.nse_ns));
    let mut opts = lab.nsc_options("bad").unwrap();
    // Unavailable is retried until this passes: keep the test short.
    opts.request_timeout = "6s".into();
    let run = nsc::run(&client, &opts).unwrap();
    assert_ne!(run.code(), Some(0), "nsc-init must fail: {}", run.reason());
    let reason = run.reason();
    assert!(
        reason.to_lowercase().contains("unavailable")
            && reason.contains("client proxy \"haproxy\"")
            && reason.contains("config broken"),
        "the reason and the proxy's last words reach the client: {reason}"
    );
    assert_eq!(before.diff(&snapshot(&client)), Vec::<String>::new());
    assert_eq!(
        nse_before.diff(&snapshot(&lab.nse_ns)),
        Vec::<String>::new()
    );
    let left = std::process::Command::new("ip")
        .args(["netns", "pids", client.name()])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&left.stdout).trim(),
        "",
        "no process left in the client"
    );
    drop(lab);

    // An endpoint that names a proxy the node agent does not define.
    let file = proxies_file(&dir, None);
    let lab = self::lab(&dir, &file, "envoy").unwrap();
    let client = lab.client().unwrap();
    let before = snapshot(&client);
    let run = nsc::run(&client, &lab.nsc_options("unknown").unwrap()).unwrap();
    let reason = run.reason();
    assert!(
        reason.contains("FailedPrecondition")
            && reason.contains("sidecarProxy \"envoy\"")
            && reason.contains("offers only haproxy"),
        "{reason}"
    );
    assert_eq!(before.diff(&snapshot(&client)), Vec::<String>::new());
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_dead_pod_takes_its_proxy_and_a_restarted_node_agent_adopts_the_running_ones() {
    let dir = workdir("injected-life");
    let file = upgradable(&dir, 1);
    let Some(mut lab) = lab(&dir, &file, "haproxy") else {
        return;
    };
    let alive = lab.client().unwrap();
    lab.attach_static_client(&alive).unwrap();
    let (_keep, _) = nsc::watch(
        &alive,
        &lab.nsc_options("alive").unwrap(),
        &lab.dir.join("a.log"),
        UP,
    )
    .unwrap_or_else(|e| panic!("nsc-init: {e}{}", lab.logs()));
    let doomed = lab.client().unwrap();
    let (mut gone, _) = nsc::watch(
        &doomed,
        &lab.nsc_options("doomed").unwrap(),
        &lab.dir.join("d.log"),
        UP,
    )
    .unwrap_or_else(|e| panic!("nsc-init: {e}{}", lab.logs()));
    let doomed_proxy = proxies_in(&doomed);
    assert_eq!(doomed_proxy.len(), 1);

    // The pod dies without a Close: its processes go, then its namespace
    // (which our proxy alone must not keep alive).
    gone.signal(Signal::SIGKILL);
    let _ = gone.wait(UP);
    doomed.delete_leaving_processes();
    assert!(
        nsm_tests::eventually(Duration::from_secs(15), || {
            !Path::new(&format!("/proc/{}", doomed_proxy[0])).exists()
        }),
        "the dead pod's proxy was stopped{}",
        lab.logs()
    );

    // kill -9 of the node agent: its proxy lives on in the pod and keeps
    // serving; the restarted agent adopts it (same process, no duplicate)
    // without waiting for a refresh.
    let old = proxies_in(&alive);
    assert_eq!(old.len(), 1);
    let fwd = lab.forwarder().unwrap();
    fwd.signal(Signal::SIGKILL);
    fwd.wait(UP).unwrap();
    assert_eq!(proxies_in(&alive), old, "the proxy outlived the node agent");
    assert_through_the_injected_proxy(&lab, &alive);
    lab.start_forwarder().unwrap();
    let fwd = lab.forwarder().unwrap();
    let adopted = fwd.wait_for_line("the running proxy adopted", UP, |l| {
        l.contains("adopted the connection's running client proxy")
    });
    assert!(adopted.is_ok(), "{adopted:?}{}", lab.logs());
    assert_eq!(proxies_in(&alive), old, "the same proxy, not a duplicate");
    assert_through_the_injected_proxy(&lab, &alive);

    // Adopted means supervised: kill -9 of the adopted proxy starts it again.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old[0] as i32), Signal::SIGKILL).unwrap();
    assert!(
        nsm_tests::eventually(UP, || {
            let now = proxies_in(&alive);
            now.len() == 1 && now != old
        }),
        "the adopted proxy was restarted{}",
        lab.logs()
    );
    assert!(
        nsm_tests::eventually(Duration::from_secs(5), || http_get(
            &alive,
            server_addr(),
            IO
        )
        .is_ok()),
        "requests flow again{}",
        lab.logs()
    );
    assert_through_the_injected_proxy(&lab, &alive);

    // The definition changed while the agent was down: the restarted agent
    // adopts the old proxy and upgrades it, not a second copy of the old.
    let before = proxies_in(&alive);
    let fwd = lab.forwarder().unwrap();
    fwd.signal(Signal::SIGKILL);
    fwd.wait(UP).unwrap();
    upgradable(&dir, 2);
    lab.start_forwarder().unwrap();
    let fwd = lab.forwarder().unwrap();
    let upgraded = fwd.wait_for_line("the stale proxy upgraded", UP, |l| {
        l.contains("client proxy upgraded")
    });
    assert!(upgraded.is_ok(), "{upgraded:?}{}", lab.logs());
    assert!(
        nsm_tests::eventually(Duration::from_secs(10), || {
            let now = proxies_in(&alive);
            now.len() == 1 && !before.contains(&now[0])
        }),
        "the old proxy drained away, one new one runs: {:?}{}",
        proxies_in(&alive),
        lab.logs()
    );
    let now = proxies_in(&alive);
    assert!(inspect::environ(now[0]).contains(&"VERSION=2".to_owned()));
    assert_through_the_injected_proxy(&lab, &alive);
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An HAProxy whose ports come from its environment (the template), asked
/// to stop gracefully (SIGUSR1: it stops listening and finishes its
/// connections), tagged `version`.
fn upgradable(dir: &Path, version: u32) -> PathBuf {
    let cfg = dir.join(CFG);
    let text = examples::proxy::haproxy_config(&[15001], 1337).replace(
        "    bind :15001\n",
        "    bind \":${PROXY_PORT}\"\n    bind \":${INBOUND_PORT}\"\n",
    );
    std::fs::write(&cfg, text).unwrap();
    let file = dir.join("proxies.yaml");
    // Written whole and renamed, as a ConfigMap update is.
    let tmp = dir.join("proxies.yaml.new");
    std::fs::write(
        &tmp,
        format!(
            "version: 1\nproxies:\n  haproxy:\n    command: [haproxy, -db, -f, {}]\n    env: {{PROXY_PORT: '{{{{proxyPort}}}}', INBOUND_PORT: '{{{{inboundPort}}}}', VERSION: '{version}'}}\n    user: 1337\n    stopSignal: SIGUSR1\n    drainTimeout: 30s\n",
            cfg.display()
        ),
    )
    .unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    file
}

#[test]
fn an_upgrade_sends_new_connections_to_the_new_proxy_while_the_old_one_drains() {
    let dir = workdir("injected-upgrade");
    let file = upgradable(&dir, 1);
    const METRICS: &str = "127.0.0.1:19467";
    let Some(mut lab) = lab_with(&dir, &file, "haproxy", &["--metrics-listen-on", METRICS]) else {
        return;
    };
    let client = lab.client().unwrap();
    lab.attach_static_client(&client).unwrap();
    let mut opts = lab.nsc_options("upgrade").unwrap();
    // Refreshes every ~2 s: one comes after the upgrade.
    opts.request_timeout = "3s".into();
    opts.token_lifetime = Some("6s".into());
    let (mut nsc, _) = nsc::watch(&client, &opts, &lab.dir.join("nsc.log"), UP)
        .unwrap_or_else(|e| panic!("nsc-init: {e}{}", lab.logs()));
    let old = proxies_in(&client);
    assert_eq!(old.len(), 1);
    assert!(examples::proxy::listening(old[0], 15001));

    // A long-lived connection through the first proxy.
    let mut held = lab.hold(&client, 9090).unwrap();
    assert_ne!(
        held.peer,
        held.app.local_addr().unwrap(),
        "through the proxy"
    );
    held.echo(b"before").unwrap();

    // The definition changes: a new proxy on the upgrade ports, the rules
    // switched to it, the old one draining.
    upgradable(&dir, 2);
    let fwd = lab.forwarder().unwrap();
    let upgraded = fwd.wait_for_line("the upgrade", UP, |l| l.contains("client proxy upgraded"));
    assert!(upgraded.is_ok(), "{upgraded:?}{}", lab.logs());
    let now = proxies_in(&client);
    let new: Vec<u32> = now.iter().copied().filter(|p| !old.contains(p)).collect();
    assert_eq!(
        new.len(),
        1,
        "one new proxy beside the draining one: {now:?}"
    );
    assert!(inspect::environ(new[0]).contains(&"VERSION=2".to_owned()));
    // Its readiness was checked without a connection to its port, which a
    // transparent proxy would relay to itself, over and over.
    let to_itself = std::fs::read_to_string(format!("/proc/{}/net/tcp", new[0]))
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.contains(&format!(
                ":{:04X} ",
                15001 + forwarder_plugin::hop::UPGRADE_PORT_SHIFT
            ))
        })
        .count();
    assert!(
        to_itself <= 1,
        "only the listener on the new port, no connections to it: {to_itself}"
    );
    let shift = 15001 + forwarder_plugin::hop::UPGRADE_PORT_SHIFT;
    assert!(
        examples::proxy::listening(new[0], shift),
        "the new proxy listens on {shift}"
    );
    assert!(
        nsm_tests::eventually(Duration::from_secs(5), || !examples::proxy::listening(
            old[0], 15001
        )),
        "the old proxy stopped listening (draining)"
    );

    // New connections reach the server (only the new proxy listens), the
    // old connection still flows through the old proxy, which is alive.
    assert_through_the_injected_proxy(&lab, &client);
    held.echo(b"during the drain").unwrap();
    assert!(
        Path::new(&format!("/proc/{}", old[0])).exists(),
        "the old proxy drains"
    );

    // Its last connection ends: it exits.
    drop(held);
    assert!(
        nsm_tests::eventually(Duration::from_secs(10), || proxies_in(&client) == new),
        "the old proxy exited once drained: {:?}",
        proxies_in(&client)
    );

    // A refresh keeps the upgraded proxy and its ports (the endpoint does
    // not know them); Close stops it.
    let fwd = lab.forwarder().unwrap();
    let from = fwd.log().len();
    let refreshed = fwd.wait_until("a refresh after the upgrade", UP, |p| {
        p.log()[from..].contains("refreshed=true").then_some(())
    });
    assert!(refreshed.is_ok(), "{refreshed:?}{}", lab.logs());
    assert_eq!(proxies_in(&client), new, "the same proxy after the refresh");
    assert!(examples::proxy::listening(new[0], shift));
    assert_through_the_injected_proxy(&lab, &client);
    let metrics = nsm_tests::scrape_metrics(METRICS);
    for event in ["start", "upgrade"] {
        let series = format!("nsm_forwarder_client_proxy_events_total{{event=\"{event}\"}}");
        assert_eq!(
            nsm_tests::metric_value(&metrics, &series),
            Some(1.0),
            "{series}: {metrics}"
        );
    }
    let status = nsc.terminate(UP).unwrap();
    assert!(status.success(), "{status}: {}", nsc.tail());
    assert_eq!(
        proxies_in(&client),
        Vec::<u32>::new(),
        "no proxy after Close"
    );
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}
