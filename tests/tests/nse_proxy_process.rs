//! `proxy.process` (issue 13, shared placement): the endpoint runs the
//! proxy itself, HAProxy here, in its own namespace as the proxy user: a
//! Request is answered once the proxy is ready; a proxy killed with -9 is
//! started again; a proxy that cannot start fails the Request with the
//! reason and leaves nothing; a graceful end with no connection left ends
//! the proxy, while a killed endpoint leaves it running for the restarted
//! one to adopt (or replace, when its definition changed meanwhile).

mod nse_support;

use std::process::Command;
use std::time::Duration;

use nse_support::*;
use nsm_tests::netns::TestNetns;

/// The haproxy processes in `ns`, with their uid.
fn proxies(ns: &TestNetns) -> Vec<(u32, u32)> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns.name()])
        .output()
        .expect("ip netns pids");
    let pids = String::from_utf8_lossy(&out.stdout).into_owned();
    pids.split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "haproxy")
        })
        .filter_map(|p| {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            let uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((p, uid))
        })
        .collect()
}

/// An endpoint whose config runs `command` as its proxy.
async fn endpoint(dir: &TempDir, command: &str, start_timeout: &str) -> Nse {
    let config = config(dir, command, start_timeout, "");
    Nse::start(&[("NSM_CONFIG", config.to_str().unwrap())]).await
}

/// [`endpoint`] with `extra` lines in its process definition, its state in
/// `state`, in namespace `netns` (`None`: a fresh one).
async fn endpoint_in(
    dir: &TempDir,
    command: &str,
    extra: &str,
    state: &str,
    netns: Option<nsm_tests::netns::TestNetns>,
) -> Nse {
    let config = config(dir, command, "5s", extra);
    Nse::start_with(
        &[
            ("NSM_CONFIG", config.to_str().unwrap()),
            ("NSM_STATE_DIR", state),
        ],
        StartOptions {
            netns,
            ..Default::default()
        },
    )
    .await
}

fn config(dir: &TempDir, command: &str, start_timeout: &str, extra: &str) -> std::path::PathBuf {
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(&cfg, examples::proxy::haproxy_config(&[15001], 1337)).unwrap();
    let config = dir.path().join("config.yaml");
    let command = command.replace("CFG", &cfg.display().to_string());
    std::fs::write(
        &config,
        format!(
            "version: 1\nplacement: proxy\nproxy:\n  port: 15001\n  process:\n    command: {command}\n    user: 1337\n    startTimeout: {start_timeout}\n    drainTimeout: 1s\n{extra}"
        ),
    )
    .unwrap();
    config
}

/// Root and HAProxy, or a printed skip (a failure under CI=true).
fn can_run() -> bool {
    if !nsm_tests::require_root("proxy.process") {
        return false;
    }
    if !nsm_tests::require_tool("proxy.process", "haproxy") {
        return false;
    }
    true
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..100 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within 5 s");
}

#[tokio::test]
async fn the_endpoint_runs_its_proxy_restarts_it_and_stops_it() {
    if !can_run() {
        return;
    }
    let dir = TempDir::new();
    let nse = endpoint(&dir, "[haproxy, -db, -f, CFG]", "5s").await;
    let ns = nse.netns.as_ref().expect("its namespace");
    let (conn, _) = nse
        .request(req_p())
        .await
        .expect("Request with the proxy ready");
    let running = proxies(ns);
    assert_eq!(running.len(), 1, "one proxy: {running:?}\n{}", nse.log());
    let (first, uid) = running[0];
    assert_eq!(uid, 1337, "it runs as the proxy user");
    // It listens where the redirect rules send traffic.
    ns.exec_ok(&["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/15001"]);

    // kill -9: started again (a new process), and serving again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let second = wait_for("a new proxy", || {
        proxies(ns)
            .into_iter()
            .map(|(p, _)| p)
            .find(|p| *p != first)
    })
    .await;
    let (again, _) = nse
        .request(req_p())
        .await
        .expect("Request after the restart");
    assert!(proxies(ns).iter().any(|(p, _)| *p == second));
    assert!(nse.log().contains("proxy failed"), "{}", nse.log());
    nse.close(conn).await.expect("Close");
    nse.close(again).await.expect("Close");

    // SIGTERM: the endpoint stops its proxy on the way out.
    let pid = nix::unistd::Pid::from_raw(nse.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_for("the proxy gone after SIGTERM", || {
        proxies(ns).is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_restarted_endpoint_adopts_its_running_proxy_and_replaces_a_changed_one() {
    if !can_run() {
        return;
    }
    let dir = TempDir::new();
    let state = dir.path().join("state");
    let env_state = state.display().to_string();
    let nse = endpoint_in(&dir, "[haproxy, -db, -f, CFG]", "", &env_state, None).await;
    nse.request(req_p()).await.expect("Request");
    let ns = nse.netns.as_ref().unwrap();
    let first = wait_for("the proxy", || proxies(ns).first().map(|(p, _)| *p)).await;

    // kill -9 of the endpoint: the proxy lives on, and the restarted
    // endpoint adopts it (the same process, no second one).
    let ns = nse.kill().expect("its namespace");
    assert_eq!(
        proxies(&ns).iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        [first],
        "the proxy outlived its endpoint"
    );
    let nse = endpoint_in(&dir, "[haproxy, -db, -f, CFG]", "", &env_state, Some(ns)).await;
    let ns = nse.netns.as_ref().unwrap();
    nse.request(req_p())
        .await
        .expect("Request served by the adopted proxy");
    assert!(
        nse.log()
            .contains("adopted the proxy an earlier run started"),
        "{}",
        nse.log()
    );
    assert_eq!(
        proxies(ns).iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        [first],
        "the same proxy, not a duplicate"
    );

    // The definition changes while the endpoint is down: the restarted
    // endpoint replaces the adopted proxy with one of the new definition.
    let ns = nse.kill().expect("its namespace");
    let nse = endpoint_in(
        &dir,
        "[haproxy, -db, -f, CFG]",
        "    env: {VERSION: '2'}\n",
        &env_state,
        Some(ns),
    )
    .await;
    let ns = nse.netns.as_ref().unwrap();
    let replaced = wait_for("the replaced proxy", || {
        let now = proxies(ns);
        (now.len() == 1 && now[0].0 != first).then(|| now[0].0)
    })
    .await;
    let env = std::fs::read(format!("/proc/{replaced}/environ")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&env).contains("VERSION=2"),
        "the new definition runs"
    );
    nse.request(req_p())
        .await
        .expect("Request served by the new proxy");
    assert!(
        nse.log().contains("runs a definition that changed"),
        "{}",
        nse.log()
    );
}

#[tokio::test]
async fn a_proxy_that_cannot_start_fails_the_request_with_the_reason() {
    if !nsm_tests::require_root("proxy.process") {
        return;
    }
    let dir = TempDir::new();
    let nse = endpoint(&dir, "[no-such-proxy-binary, CFG]", "500ms").await;
    let err = nse.request(req_p()).await.expect_err("no proxy");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("not ready") && err.message().contains("no-such-proxy-binary"),
        "{}",
        err.message()
    );
    // Nothing of the connection stayed in the endpoint's table.
    let ns = nse.netns.as_ref().unwrap();
    let rules = ns.exec(&["nft", "list", "ruleset"]);
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains("elements"),
        "{}",
        String::from_utf8_lossy(&rules.stdout)
    );
    // One that exits at once: its own words are in the reason.
    let dir = TempDir::new();
    let nse = endpoint(&dir, "[haproxy, -db, -f, /nonexistent.cfg]", "500ms").await;
    if examples::proxy::haproxy_path().is_some() {
        let err = nse.request(req_p()).await.expect_err("no proxy");
        assert!(
            err.message().contains("exited") && err.message().contains("nonexistent.cfg"),
            "{}",
            err.message()
        );
    }
}

/// A line of `/proc/<pid>/limits` by its name, e.g. "Max open files".
fn limit(pid: u32, name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(name))
        .map(|l| {
            l[name.len()..]
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        })
}

#[tokio::test]
async fn the_proxy_runs_within_its_limits() {
    if !can_run() {
        return;
    }
    let dir = TempDir::new();
    let state = dir.path().join("state").display().to_string();
    let nse = endpoint_in(
        &dir,
        "[haproxy, -db, -f, CFG]",
        "    limits: {openFiles: 16384, memory: 256Mi}\n",
        &state,
        None,
    )
    .await;
    if let Err(e) = nse.request(req_p()).await {
        panic!("Request: {e:?}\n{}", nse.log());
    }
    let ns = nse.netns.as_ref().unwrap();
    let (pid, _) = proxies(ns)[0];
    assert_eq!(
        limit(pid, "Max open files").as_deref(),
        Some("16384 16384"),
        "the open-files rlimit"
    );
    // Memory needs cgroup v2 with the memory controller delegated to us;
    // where the kernel does not give it, the log says why.
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    if let Some(path) = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .filter(|p| p.contains("/mesh-proxies/"))
    {
        let max = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.max")).unwrap();
        assert_eq!(max.trim(), (256u64 << 20).to_string());
    } else {
        assert!(
            nse.log()
                .contains("the proxy runs without its memory, CPU and process limits"),
            "neither in a cgroup of its own ({cgroup}) nor a reason why:\n{}",
            nse.log()
        );
    }
}
