//! `local-demo --injected`: placement sidecar with no proxy in the pod. The
//! endpoint names the node agent's proxy (`sidecarProxy`), and
//! `forwarder-plugin serve --proxies` starts it inside the client's
//! namespace as uid 1337 before nsc-init returns; the client's TCP goes
//! through it, a crash restarts it while traffic waits, Close takes it away.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use examples::inspect;
use examples::lab::{Lab, LabConfig, STATIC_CLIENT_IP, server_addr};
use examples::namespace::Namespace;
use examples::process;
use examples::proxy::ProxyKind;
use examples::traffic::http_get;

use super::{DemoError, check, indent, show_links, step};

/// The node agent's name for the proxy it injects.
const NAME: &str = "demo-proxy";
/// The uid it runs as: the redirect spec's default `proxyUids`.
const PROXY_UID: u32 = 1337;

/// The endpoint's NSM_CONFIG and the node agent's proxies file in
/// `scratch`; the proxy writes its connection lines to `proxy.log` there.
pub fn lab_config(proxy: ProxyKind, scratch: &Path) -> Result<LabConfig, DemoError> {
    let io = |e: std::io::Error| DemoError::Io(format!("{}: {e}", scratch.display()));
    std::fs::create_dir_all(scratch).map_err(io)?;
    std::fs::set_permissions(scratch, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
    let log = scratch.join("proxy.log");
    std::fs::write(&log, "").map_err(io)?;
    nix::unistd::chown(&log, Some(PROXY_UID.into()), Some(PROXY_UID.into()))
        .map_err(|e| DemoError::Io(format!("{}: {e}", log.display())))?;
    let program = match proxy {
        ProxyKind::Haproxy => {
            let cfg = scratch.join("haproxy.cfg");
            let text = examples::proxy::haproxy_config(&[15001], PROXY_UID).replace(
                "    bind :15001\n",
                "    bind \":${PROXY_PORT}\"\n    bind \":${INBOUND_PORT}\"\n",
            );
            std::fs::write(&cfg, text).map_err(io)?;
            format!("haproxy -db -f {}", cfg.display())
        }
        _ => format!(
            "{} --port $PROXY_PORT --port $INBOUND_PORT",
            process::bin("transparent-proxy").display()
        ),
    };
    let proxies = scratch.join("proxies.yaml");
    let text = format!(
        "version: 1\nproxies:\n  {NAME}:\n    command: [sh, -c, 'exec {program} >> {} 2>&1']\n    \
         env: {{PROXY_PORT: '{{{{proxyPort}}}}', INBOUND_PORT: '{{{{inboundPort}}}}'}}\n    \
         user: {PROXY_UID}\n    drainTimeout: 1s\n",
        log.display()
    );
    std::fs::write(&proxies, &text).map_err(io)?;
    println!(
        "the node agent's proxies file (forwarder-plugin serve --proxies):\n{}",
        indent(&text)
    );
    let nse = scratch.join("nse-injected.yaml");
    let text = format!("version: 1\nplacement: sidecar\nsidecarProxy: {NAME}\n");
    std::fs::write(&nse, &text).map_err(io)?;
    println!("NSM_CONFIG of the endpoint:\n{}", indent(&text));
    Ok(LabConfig {
        proxy,
        nse_env: vec![("NSM_CONFIG".into(), nse.display().to_string())],
        forwarder_args: vec!["--proxies".into(), proxies.display().to_string()],
        ..Default::default()
    })
}

/// The pids of our injected proxy in `ns`: its processes of the proxy uid.
fn proxy_pids(ns: &Namespace) -> Vec<u32> {
    inspect::pids_in(ns.name())
        .into_iter()
        .filter(|p| inspect::uid(*p) == Some(PROXY_UID))
        .collect()
}

/// A request from `client` through its injected proxy: the proxy logged it
/// with the original destination, and the server saw the proxy's own
/// connection from the client's address.
fn request(client: &Namespace, log: &Path, i: u32) -> Result<(), DemoError> {
    let ex = http_get(client, server_addr(), Duration::from_secs(5))?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let dst = loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(d) = examples::transparent_proxy::find_in_log(&text, ex.local) {
            break d;
        }
        check(Instant::now() < deadline, || {
            format!(
                "the injected proxy logged nothing for {}: the request did not go through it",
                ex.local
            )
        })?;
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "request {i}: app {} -> {}; the proxy in the pod saw \"{} -> {dst}\" and connected itself: the server saw {}",
        ex.local,
        server_addr(),
        ex.local,
        ex.server_saw
    );
    check(
        dst == server_addr()
            && ex.server_saw.ip() == std::net::IpAddr::V4(STATIC_CLIENT_IP)
            && ex.server_saw != ex.local,
        || "the request must reach the server as the injected proxy's own connection".into(),
    )
}

pub fn demo(lab: &mut Lab, client: &Namespace, scratch: &Path) -> Result<(), DemoError> {
    let log = scratch.join("proxy.log");
    lab.attach_static_client(client)?;
    println!(
        "client {}: its own network {STATIC_CLIENT_IP}/24 towards the server, no proxy of its own",
        client.name()
    );
    let before = inspect::snapshot(client)?;

    step("2. nsc-init --watch: the forwarder plumbs nsm-1 and injects the proxy");
    let opts = lab.nsc_options("demo-client")?;
    let (mut nsc, up) = examples::nsc::watch(
        client,
        &opts,
        &lab.dir.join("nsc-init.log"),
        Duration::from_secs(30),
    )?;
    println!("nsc-init: {} up: {} {}", up.url, up.iface, up.src.join(","));
    let pids = proxy_pids(client);
    check(pids.len() == 1, || {
        format!("one proxy in the client's namespace when nsc-init returns, found {pids:?}")
    })?;
    println!(
        "the proxy runs in {} as uid {PROXY_UID} (pid {}, a child of the node agent), \
         ready before nsc-init returned",
        client.name(),
        pids[0]
    );
    println!(
        "client {} — nft list ruleset (the forwarder's redirect rules):\n{}",
        client.name(),
        indent(&inspect::nft_ruleset(client)?)
    );

    step("3. requests from the client's app to the server");
    for i in 1..=3 {
        request(client, &log, i)?;
    }

    step("3b. kill -9 of the proxy: restarted in the pod, traffic waits meanwhile");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(|e| DemoError::Check(format!("kill {}: {e}", pids[0])))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let back = loop {
        let now = proxy_pids(client);
        if now.iter().any(|p| *p != pids[0])
            && http_get(client, server_addr(), Duration::from_secs(1)).is_ok()
        {
            break now;
        }
        check(Instant::now() < deadline, || {
            "the proxy did not come back".into()
        })?;
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("the forwarder started it again: pid {back:?}");
    request(client, &log, 4)?;

    step("4. SIGTERM to nsc-init: it Closes; the proxy drains and stops");
    let status = nsc.terminate(Duration::from_secs(15))?;
    check(status.success(), || {
        format!("nsc-init exited with {status}")
    })?;
    let left = before.diff(&inspect::snapshot(client)?);
    check(proxy_pids(client).is_empty(), || {
        "the proxy outlived Close".into()
    })?;
    check(left.is_empty(), || {
        format!("Close left this in the client: {}", left.join("; "))
    })?;
    show_links("client", client)?;
    println!(
        "nothing left: no proxy process, no {} link, no rule",
        up.iface
    );
    Ok(())
}
