//! mesh-proxy-nse as a program: `--help`, configuration errors (one line,
//! exit code 64), the TLS guard, stale sockets, and graceful SIGTERM/SIGINT.

mod nse_support;

use std::os::unix::fs::FileTypeExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nse_support::*;
use nsm_api::connection::MonitorScopeSelector;
use nsm_tests::process::{ChildGuard, bin};

/// Runs the NSE with `args` and a clean environment plus `env`; it must exit within `WAIT`.
/// It runs in the test's namespace: a state directory of its own (unless
/// `env` names one) keeps it from meeting other tests' endpoints there.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    use std::io::Read;
    let state = TempDir::new();
    let mut cmd = Command::new(bin("mesh-proxy-nse"));
    cmd.env_clear()
        .args(args)
        .env("NSM_STATE_DIR", state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = ChildGuard::spawn(&mut cmd);
    let status = wait_exit(&mut child);
    // Small outputs: the pipes never filled, so reading after exit is safe.
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut stderr)
        .unwrap();
    Output {
        status,
        stdout,
        stderr,
    }
}

#[test]
fn help_documents_every_option() {
    let out = run(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for (flag, env) in [
        ("--name", "NSM_NAME"),
        ("--listen-on", "NSM_LISTEN_ON"),
        ("--connect-to", "NSM_CONNECT_TO"),
        ("--service-names", "NSM_SERVICE_NAMES"),
        ("--labels", "NSM_LABELS"),
        ("--cidr-prefix", "NSM_CIDR_PREFIX"),
        ("--ipam-policy", "NSM_IPAM_POLICY"),
        ("--max-token-lifetime", "NSM_MAX_TOKEN_LIFETIME"),
        ("--payload", "NSM_PAYLOAD"),
        ("--log-level", "NSM_LOG_LEVEL"),
        ("--insecure", "NSM_INSECURE"),
        ("--telemetry", "TELEMETRY"),
        ("--open-telemetry-endpoint", "NSM_OPEN_TELEMETRY_ENDPOINT"),
        ("--config", "NSM_CONFIG"),
        ("--socket-group", "NSM_SOCKET_GROUP"),
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
        assert!(
            help.contains(&format!("[env: {env}")),
            "{env} missing from --help:\n{help}"
        );
    }
    for default in [
        "mesh-proxy-nse",
        "mesh-proxy",
        "169.254.0.0/16",
        "polite",
        "10m",
        "IP",
    ] {
        assert!(
            help.contains(&format!("[default: {default}]")),
            "default {default} not shown"
        );
    }
}

/// A bad configuration: environment, arguments, and what the error line must say.
struct BadConfig {
    env: &'static [(&'static str, &'static str)],
    args: &'static [&'static str],
    want: &'static str,
}

const BAD_CONFIGS: [BadConfig; 13] = [
    BadConfig {
        env: &[
            ("TELEMETRY", "true"),
            ("NSM_OPEN_TELEMETRY_ENDPOINT", "collector"),
        ],
        args: &[],
        want: "NSM_OPEN_TELEMETRY_ENDPOINT: \"collector\" is not host:port",
    },
    BadConfig {
        env: &[("TELEMETRY", "maybe")],
        args: &[],
        want: "TELEMETRY: \"maybe\" is not true or false",
    },
    BadConfig {
        env: &[("NSM_METRICS_LISTEN_ON", "9090")],
        args: &[],
        want: "NSM_METRICS_LISTEN_ON (--metrics-listen-on): \"9090\": invalid socket address syntax (expected host:port",
    },
    BadConfig {
        env: &[("NSM_STATE_DIR", "relative/state")],
        args: &[],
        want: "NSM_STATE_DIR (--state-dir): \"relative/state\" is not an absolute path",
    },
    BadConfig {
        env: &[("NSM_SOCKET_GROUP", "no-such-group-here")],
        args: &[],
        want: "NSM_SOCKET_GROUP (--socket-group): no group named",
    },
    BadConfig {
        env: &[("NSM_CIDR_PREFIX", "198.18.0.0/33")],
        args: &[],
        want: "NSM_CIDR_PREFIX (--cidr-prefix)",
    },
    BadConfig {
        env: &[("NSM_CIDR_PREFIX", "[198.18.0.0/24")],
        args: &[],
        want: "never closed",
    },
    BadConfig {
        env: &[("NSM_MAX_TOKEN_LIFETIME", "10x")],
        args: &[],
        want: "NSM_MAX_TOKEN_LIFETIME (--max-token-lifetime)",
    },
    BadConfig {
        env: &[("NSM_IPAM_POLICY", "rude")],
        args: &[],
        want: "NSM_IPAM_POLICY (--ipam-policy): \"rude\" is not an IPAM policy",
    },
    BadConfig {
        env: &[("NSM_LABELS", "app")],
        args: &[],
        want: "NSM_LABELS (--labels): \"app\" is not key:value",
    },
    BadConfig {
        env: &[("NSM_LISTEN_ON", "http://x")],
        args: &[],
        want: "NSM_LISTEN_ON (--listen-on)",
    },
    BadConfig {
        env: &[("NSM_PAYLOAD", "L2")],
        args: &[],
        want: "NSM_PAYLOAD (--payload)",
    },
    BadConfig {
        env: &[],
        args: &["--bogus"],
        want: "--bogus",
    },
];

#[test]
fn invalid_configuration_is_one_line_and_exit_64() {
    for BadConfig { env, args, want } in BAD_CONFIGS {
        let mut env = env.to_vec();
        env.push(("NSM_INSECURE", "true"));
        let out = run(args, &env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{env:?} {args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains(want), "{env:?}: {err}");
        assert!(
            err.starts_with("mesh-proxy-nse: invalid configuration:"),
            "{err}"
        );
    }
}

#[test]
fn a_bad_function_config_file_is_one_line_naming_the_key_and_exit_64() {
    let dir = TempDir::new();
    let file = dir.path().join("config.yaml");
    let missing = dir.path().join("missing.yaml");
    for (yaml, want) in [
        (
            "version: 1\nproxy:\n  port: 0\n",
            "proxy.port: port 0 out of range",
        ),
        ("version: 3\n", "version: unsupported config version 3"),
        ("version: 2\n", "functions: 0 instances"),
        (
            "version: 2\nfunctions:\n  x: {type: nat}\nchains: {a: [x]}\n",
            "functions.x: type: unknown function type \"nat\"",
        ),
        (
            "version: 2\nfunctions:\n  fw: {type: firewall}\nchains: {a: [fw, fw]}\n",
            "chains.a: \"fw\" is listed twice",
        ),
        (
            "version: 2\nfunctions:\n  a: {type: firewall}\n  b: {type: firewall}\nchains: {x: [a, b]}\n",
            "functions a and b both claim the rules table nsm_firewall",
        ),
        (
            "version: 2\nfunctions:\n  fw: {type: firewall, rules: [{action: deny, destinationCidrs: [10.0.0.0/33]}]}\nchains: {a: [fw]}\n",
            "functions.fw: rules[0]: \"10.0.0.0/33\" is not a CIDR",
        ),
        (
            "version: 2\nfunctions:\n  fw: {type: firewall, nsmAclFile: /nonexistent/acl.yaml}\nchains: {a: [fw]}\n",
            "functions.fw: nsmAclFile: cannot read /nonexistent/acl.yaml",
        ),
        (
            "version: 2\nfunctions:\n  v: {type: vpn, privateKeyFile: /nonexistent/k, address: [198.18.210.1/32], peer: {publicKey: x, endpoint: '198.18.200.2:51820', allowedIps: [198.19.200.0/24]}}\nchains: {a: [v]}\n",
            "functions.v: privateKeyFile: cannot read /nonexistent/k",
        ),
        (
            "version: 2\nfunctions:\n  fw: {type: firewall}\nchains: {a: [fw]}\nnetworkServiceFile: /nonexistent/ns.yaml\n",
            "networkServiceFile: cannot read /nonexistent/ns.yaml",
        ),
        (
            "placement: proxy\nplacment: sidecar\n",
            "unknown field `placment`",
        ),
        (
            "sidecar:\n  excludeInterfaces: [\"eth0;x\"]\n",
            "sidecar: excludeInterfaces: interface name \"eth0;x\"",
        ),
    ] {
        std::fs::write(&file, yaml).unwrap();
        let out = run(
            &[],
            &[
                ("NSM_INSECURE", "true"),
                ("NSM_CONFIG", file.to_str().unwrap()),
            ],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{yaml:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        let prefix = format!(
            "mesh-proxy-nse: invalid configuration: NSM_CONFIG (--config): {}: ",
            file.display()
        );
        assert!(err.starts_with(&prefix), "{err}");
        assert!(err.contains(want), "{yaml:?}: {err}");
    }
    let out = run(&["--insecure", "--config", missing.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn refuses_to_start_without_an_identity_unless_insecure() {
    for env in [&[][..], &[("NSM_INSECURE", "false")][..]] {
        let out = run(&[], env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("no identity: set SPIFFE_ENDPOINT_SOCKET"),
            "{err}"
        );
        assert!(err.contains("NSM_INSECURE=true"), "{err}");
    }
    // SVID files that cannot be read: a runtime failure that says which.
    let out = run(
        &[],
        &[
            ("NSM_SVID_CERT_FILE", "/nonexistent/svid.pem"),
            ("NSM_SVID_KEY_FILE", "/nonexistent/svid.key"),
            ("NSM_TRUST_BUNDLE_FILE", "/nonexistent/bundle.pem"),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot read /nonexistent/svid.pem"), "{err}");
}

#[test]
fn an_existing_regular_file_is_not_replaced() {
    let dir = TempDir::new();
    let path = dir.path().join("precious");
    std::fs::write(&path, "keep me").unwrap();
    let listen = format!("unix://{}", path.display());
    let out = run(&[], &[("NSM_INSECURE", "true"), ("NSM_LISTEN_ON", &listen)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not a unix socket: refusing to replace it"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
}

/// The socket is 0660 (owner and group), with `NSM_SOCKET_GROUP` that
/// group; a second server on the same path finds the first one answering
/// there and refuses to start, leaving it in place.
#[tokio::test]
async fn the_socket_is_0660_and_a_live_one_is_never_taken_over() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let first = Nse::start(&[("NSM_SOCKET_GROUP", "65534")]).await;
    let md = std::fs::metadata(&first.socket).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o660);
    if is_root() {
        assert_eq!(md.gid(), 65534, "the socket's group");
    }
    let listen = format!("unix://{}", first.socket.display());
    let out = run(&[], &[("NSM_INSECURE", "true"), ("NSM_LISTEN_ON", &listen)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another server is listening on"), "{err}");
    assert!(
        std::os::unix::net::UnixStream::connect(&first.socket).is_ok(),
        "the first server still answers"
    );
    // A directory anyone may write to is refused.
    let dir = TempDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let listen = format!("unix://{}/nse.sock", dir.path().display());
    let out = run(&[], &[("NSM_INSECURE", "true"), ("NSM_LISTEN_ON", &listen)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("writable by others"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_exit(child: &mut ChildGuard) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            return st;
        }
        assert!(std::time::Instant::now() < deadline, "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn stale_socket_is_replaced_and_signals_remove_it() {
    for signal in ["-TERM", "-INT"] {
        // A socket file left behind by a killed instance.
        let dir = TempDir::new();
        let stale = dir.path().join("nse.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(std::fs::metadata(&stale).unwrap().file_type().is_socket());

        let listen = format!("unix://{}", stale.display());
        let mut nse = Nse::start(&[("NSM_LISTEN_ON", &listen)]).await;
        assert_eq!(nse.socket, stale, "serving on the formerly stale path");
        // An open monitor stream must not hold up the shutdown.
        let (mut stream, _) = nse.monitor(MonitorScopeSelector::default()).await;

        Command::new("kill")
            .args([signal, &nse.pid().to_string()])
            .status()
            .unwrap();
        // Poll without blocking the runtime: the client must answer the server's GOAWAY/PING.
        let deadline = std::time::Instant::now() + WAIT;
        let st = loop {
            if let Some(st) = nse.child.0.try_wait().unwrap() {
                break st;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{signal}: did not exit"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(st.success(), "{signal}: exit {st}:\n{}", nse.log());
        assert!(!stale.exists(), "{signal}: socket left behind");
        let log = nse.log();
        assert!(log.contains("shutting down"), "{log}");
        assert!(
            !log.contains("did not finish"),
            "{signal}: shutdown was not graceful:\n{log}"
        );
        assert!(
            !matches!(stream.message().await, Ok(Some(_))),
            "{signal}: stream still delivering"
        );
    }
}

/// As NSM's components do: SIGUSR1 switches the log to TRACE and SIGUSR2
/// back to the configured level, and neither stops the endpoint (their
/// default action would kill it); `NSM_LOG_FORMAT=json` writes one JSON
/// object per line.
#[tokio::test]
async fn sigusr1_traces_sigusr2_restores_and_json_lines_parse() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use tonic_health::pb::health_check_response::ServingStatus;
    const SVC: &str = "networkservice.NetworkService";
    let nse = Nse::start(&[("NSM_LOG_LEVEL", "INFO"), ("NSM_LOG_FORMAT", "json")]).await;
    let events = || -> Vec<serde_json::Value> {
        nse.log()
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line: {l}: {e}"))
            })
            .collect()
    };
    let traced = |evs: &[serde_json::Value]| evs.iter().filter(|e| e["level"] == "TRACE").count();
    let switched_to = |evs: &[serde_json::Value], level: &str| {
        evs.iter()
            .any(|e| e["fields"]["message"] == "log level" && e["fields"]["level"] == level)
    };
    assert!(!events().is_empty(), "the endpoint logs JSON lines");
    assert_eq!(traced(&events()), 0, "INFO: no TRACE lines yet");

    let pid = Pid::from_raw(nse.pid() as i32);
    kill(pid, Signal::SIGUSR1).unwrap();
    let mut ok = false;
    for _ in 0..100 {
        // Calls make TRACE events (the gRPC stack's) once TRACE is on.
        assert_eq!(nse.health(SVC).await.unwrap(), ServingStatus::Serving);
        if switched_to(&events(), "TRACE") && traced(&events()) > 0 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "SIGUSR1: TRACE lines: {}", nse.log());

    kill(pid, Signal::SIGUSR2).unwrap();
    let mut back = false;
    for _ in 0..100 {
        if switched_to(&events(), "INFO") {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "SIGUSR2: back to INFO: {}", nse.log());
    let after = traced(&events());
    assert_eq!(nse.health(SVC).await.unwrap(), ServingStatus::Serving);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(traced(&events()), after, "no TRACE lines after SIGUSR2");
}

/// `--probe`, what the manifests' exec probes run: with the container's own
/// environment it passes while the endpoint serves (over mTLS with the
/// container's SVID, as NSM's grpc-health-probe -spiffe does), fails with
/// the reason for a caller the endpoint does not trust, and fails once the
/// endpoint is gone.
#[test]
fn the_exec_probe_passes_only_while_the_endpoint_serves() {
    let dir = TempDir::new();
    let issue = |ca: &examples::svid::TestCa, sub: &str| {
        let d = dir.path().join(sub);
        std::fs::create_dir_all(&d).unwrap();
        ca.write(
            &ca.issue("/ns/nsm-system/pod/mesh-proxy-nse-0").unwrap(),
            &d,
        )
        .unwrap()
    };
    let ours = issue(&examples::svid::TestCa::new("k8s.nsm").unwrap(), "ours");
    let theirs = issue(
        &examples::svid::TestCa::new("elsewhere.test").unwrap(),
        "theirs",
    );
    let config = dir.path().join("sidecar.yaml");
    std::fs::write(&config, "version: 1\nplacement: sidecar\n").unwrap();
    let listen = format!("unix://{}", dir.path().join("nse.sock").display());
    let env = |files: &nsm_api::tls::SvidFiles| -> Vec<(&'static str, String)> {
        vec![
            ("NSM_NAME", "mesh-proxy-nse-0".into()),
            ("NSM_LISTEN_ON", listen.clone()),
            ("NSM_CONFIG", config.display().to_string()),
            (
                "NSM_STATE_DIR",
                dir.path().join("state").display().to_string(),
            ),
            ("NSM_SVID_CERT_FILE", files.cert.display().to_string()),
            ("NSM_SVID_KEY_FILE", files.key.display().to_string()),
            ("NSM_TRUST_BUNDLE_FILE", files.bundle.display().to_string()),
        ]
    };
    let probe = |files: &nsm_api::tls::SvidFiles| {
        let env = env(files);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run(&["--probe"], &env)
    };

    let out = probe(&ours);
    assert_eq!(out.status.code(), Some(1), "nothing serves yet");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("not healthy") && err.contains("cannot reach"),
        "{err}"
    );

    let log = dir.path().join("nse.log");
    let mut cmd = Command::new(bin("mesh-proxy-nse"));
    cmd.env_clear()
        .envs(env(&ours))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut nse = ChildGuard::spawn(&mut cmd);
    let mut passed = false;
    for _ in 0..100 {
        if probe(&ours).status.success() {
            passed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        passed,
        "the probe never passed: {}\n{}",
        String::from_utf8_lossy(&probe(&ours).stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    let out = probe(&theirs);
    assert_eq!(out.status.code(), Some(1), "an untrusted SVID passed");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("not healthy"), "{err}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(nse.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = nse.0.wait();
    let out = probe(&ours);
    assert_eq!(out.status.code(), Some(1), "the endpoint has stopped");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}
