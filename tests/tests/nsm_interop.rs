//! Against NSM itself: NSM's registry and nsmgr (the sdk's own chains at
//! v1.15.0, run by `tests/go/nsm-domain`) with our forwarder and endpoint
//! registered in them, and NSM's client (the sdk's client chain: refresh,
//! heal, kernel mechanism, grpcfd) asking for `kernel://mesh-proxy/nsm-1`
//! from a client namespace. Both of NSM's modes: mTLS with SVIDs from the
//! lab's CA and NSM's shipped policies, and the sdk sandbox's insecure mode.
//!
//! Needs root and Go (tests/run.sh builds `nsm-domain` into the target
//! directory); under CI=true a missing piece fails instead of skipping.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use examples::inspect;
use examples::lab::{
    FORWARDER_SPIFFE_PATH, Lab, LabConfig, NSE_SPIFFE_PATH, NSE_UPLINK, TRUST_DOMAIN, server_addr,
};
use examples::namespace::Namespace;
use examples::process::Process;
use examples::proxy::ProxyKind;
use examples::traffic::http_get;
use nix::sys::signal::Signal;
use serde_json::Value;

const DOMAIN_BIN: &str = "nsm-domain";
const START: Duration = Duration::from_secs(20);
const REQUEST: Duration = Duration::from_secs(40);
const IO: Duration = Duration::from_secs(5);
const CLIENT: &str = "web-0";
const CLIENT_SPIFFE_PATH: &str = "/ns/default/pod/web-0";
const NSMGR_SPIFFE_PATH: &str = "/ns/nsm-system/pod/nsmgr";
const REGISTRY_SPIFFE_PATH: &str = "/ns/nsm-system/pod/registry";

/// `nsm-domain`, or `None` (skipped) where it is not built outside CI.
fn domain_bin() -> Option<PathBuf> {
    nsm_tests::go_bin(DOMAIN_BIN, "tests/go/nsm-domain")
}

/// NSM's control plane of one node: its registry and its nsmgr.
struct Domain {
    bin: PathBuf,
    dir: PathBuf,
    nsmgr: Process,
    registry: Process,
}

impl Domain {
    fn start(lab: &Lab, bin: PathBuf) -> Domain {
        let dir = lab.dir.join("nsm");
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = domain_command(lab, Command::new(&bin), "registry", REGISTRY_SPIFFE_PATH);
        cmd.env("NSM_LISTEN_ON", unix(&dir.join("registry.sock")));
        let mut registry = Process::spawn("nsm registry", &mut cmd, &dir.join("registry.log"))
            .unwrap_or_else(|e| panic!("{e}"));
        registry
            .wait_for_path(&dir.join("registry.sock"), START)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut cmd = domain_command(lab, Command::new(&bin), "nsmgr", NSMGR_SPIFFE_PATH);
        cmd.env("NSM_NAME", "nsmgr-node-a")
            .env("NSM_LISTEN_ON", unix(&dir.join("nsm.io.sock")))
            .env("NSM_REGISTRY_URL", unix(&dir.join("registry.sock")));
        let mut nsmgr = Process::spawn("nsmgr", &mut cmd, &dir.join("nsmgr.log"))
            .unwrap_or_else(|e| panic!("{e}"));
        nsmgr
            .wait_for_path(&dir.join("nsm.io.sock"), START)
            .unwrap_or_else(|e| panic!("{e}"));
        Domain {
            bin,
            dir,
            nsmgr,
            registry,
        }
    }

    fn url(&self) -> String {
        unix(&self.dir.join("nsm.io.sock"))
    }

    /// NSM's client in `ns`, asking nsmgr for `kernel://mesh-proxy/nsm-1`.
    fn client(&self, lab: &Lab, ns: &Namespace, lifetime: &str) -> Process {
        // Started inside the namespace: every thread of the Go process is
        // in it, so the /proc/thread-self/ns/net it sends is the client's.
        let mut cmd = domain_command(lab, ns.command(&self.bin), "nsc", CLIENT_SPIFFE_PATH);
        cmd.env("NSM_NAME", CLIENT)
            .env("NSM_CONNECT_TO", self.url())
            .env("NSM_NETWORK_SERVICES", "kernel://mesh-proxy/nsm-1")
            .env("NSM_MAX_TOKEN_LIFETIME", lifetime)
            // Below the token lifetime, or nsmgr's timeout closes the
            // connection at once (it expires a request timeout early).
            .env("NSM_REQUEST_TIMEOUT", "4s");
        Process::spawn(
            "nsm client",
            &mut cmd,
            &self.dir.join(format!("nsc-{}.log", ns.name())),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn logs(&self, lab: &Lab) -> String {
        format!(
            "{}\n--- nsmgr: {}\n--- registry: {}",
            lab.logs(),
            self.nsmgr.tail(),
            self.registry.tail()
        )
    }
}

fn unix(path: &Path) -> String {
    format!("unix://{}", path.display())
}

/// A role of `nsm-domain` with the lab's identity for `spiffe_path` (or
/// NSM_INSECURE=true in an insecure lab).
fn domain_command(lab: &Lab, mut cmd: Command, role: &str, spiffe_path: &str) -> Command {
    cmd.arg(role)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(std::env::vars().filter(|(k, _)| k.starts_with("GRPC_GO_")))
        // NSM_DOMAIN_LOG_LEVEL=TRACE shows what nsmgr and the registry did
        // (the sdk's client chain crashes tracing outside a server).
        .env(
            "NSM_LOG_LEVEL",
            match std::env::var("NSM_DOMAIN_LOG_LEVEL") {
                Ok(l) if role != "nsc" => l,
                _ => "INFO".into(),
            },
        )
        .envs(
            lab.identity_env(&format!("nsm-{role}"), spiffe_path)
                .unwrap_or_else(|e| panic!("{e}")),
        );
    cmd
}

/// The client's events so far (`{"event": …}` lines on its stdout).
fn events(client: &Process) -> Vec<Value> {
    client
        .log()
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e.get("event").is_some())
        .collect()
}

fn requests(client: &Process) -> Vec<Value> {
    events(client)
        .into_iter()
        .filter(|e| e["event"] == "request")
        .map(|e| e["connection"].clone())
        .collect()
}

/// Waits for the `n`th successful Request of the client and returns its connection.
fn nth_request(client: &mut Process, n: usize, timeout: Duration) -> Result<Value, String> {
    client
        .wait_until(&format!("request #{n}"), timeout, |p| {
            requests(p).into_iter().nth(n - 1)
        })
        .map_err(|e| e.to_string())
}

/// A lab whose forwarder and endpoint join NSM's domain.
fn lab_in_domain(secure: bool) -> Option<(Lab, Domain)> {
    if !nsm_tests::require_root("nsm_interop") {
        return None;
    }
    let bin = domain_bin()?;
    let mut lab = Lab::data_path(LabConfig {
        proxy: ProxyKind::Builtin,
        secure,
        log_level: std::env::var("MP_LOG_LEVEL").unwrap_or_else(|_| "INFO".into()),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("lab: {e}"));
    let domain = Domain::start(&lab, bin);
    lab.config.manager = Some(domain.url());
    lab.start_nse()
        .unwrap_or_else(|e| panic!("{e}{}", domain.logs(&lab)));
    lab.start_forwarder()
        .unwrap_or_else(|e| panic!("{e}{}", domain.logs(&lab)));
    for who in ["forwarder", "nse"] {
        let p = match who {
            "forwarder" => lab.forwarder(),
            _ => lab.nse(),
        }
        .unwrap();
        if let Err(e) = p.wait_for_line("registered with nsmgr", START, |l| {
            l.contains("registered") && !l.contains("unregistered")
        }) {
            panic!("{who}: {e}{}", domain.logs(&lab));
        }
    }
    Some((lab, domain))
}

/// The address NSM's client got on nsm-1 (`a.b.c.d/nn`).
fn client_addr(conn: &Value) -> String {
    conn["context"]["ipContext"]["srcIpAddrs"][0]
        .as_str()
        .unwrap_or_else(|| panic!("no srcIpAddrs in {conn}"))
        .to_owned()
}

fn segment_names(conn: &Value) -> Vec<String> {
    conn["path"]["pathSegments"]
        .as_array()
        .unwrap_or_else(|| panic!("no path in {conn}"))
        .iter()
        .map(|s| s["name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// TCP from the client reaches the server through the endpoint's proxy,
/// which logged the original destination.
fn assert_proxied(lab: &Lab, domain: &Domain, client: &Namespace) {
    let ex = lab
        .get_through_proxy(client, IO)
        .unwrap_or_else(|e| panic!("{e}{}", domain.logs(lab)));
    let saw = (0..100).find_map(|_| {
        lab.proxy_saw(ex.local).or_else(|| {
            std::thread::sleep(Duration::from_millis(20));
            None
        })
    });
    assert_eq!(saw, Some(server_addr()), "the proxy relayed {}", ex.local);
}

fn request_refresh_close(secure: bool) {
    let Some((lab, domain)) = lab_in_domain(secure) else {
        return;
    };
    let before = inspect::snapshot(&lab.nse_ns).unwrap();
    let ns = lab.client().unwrap();
    // A short token lifetime: NSM's client refreshes a few times a minute.
    let mut nsc = domain.client(&lab, &ns, "15s");
    let conn = nth_request(&mut nsc, 1, REQUEST)
        .unwrap_or_else(|e| panic!("NSM's client through nsmgr: {e}{}", domain.logs(&lab)));

    // The Request went NSM's way: the client to nsmgr, nsmgr to the
    // forwarder it selected (ours), the forwarder to the endpoint it
    // discovered through nsmgr's registry (ours).
    assert_eq!(
        segment_names(&conn),
        [CLIENT, "nsmgr-node-a", "forwarder-plugin", "mesh-proxy-nse"],
        "{conn}"
    );
    if secure {
        let subs: Vec<String> = conn["path"]["pathSegments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let claims = jsonwebtoken::dangerous::insecure_decode::<Value>(
                    s["token"].as_str().unwrap_or_default(),
                )
                .unwrap_or_else(|e| panic!("segment {}: {e}", s["name"]))
                .claims;
                claims["sub"].as_str().unwrap_or_default().to_owned()
            })
            .collect();
        let id = |p: &str| format!("spiffe://{TRUST_DOMAIN}{p}");
        assert_eq!(
            subs,
            [
                id(CLIENT_SPIFFE_PATH),
                id(NSMGR_SPIFFE_PATH),
                id(FORWARDER_SPIFFE_PATH),
                id(NSE_SPIFFE_PATH)
            ],
            "each hop signs its own segment"
        );
    }

    let addr = client_addr(&conn);
    let addrs = inspect::addresses(&ns, "nsm-1").unwrap();
    assert!(
        addrs.contains(&addr),
        "nsm-1 in the client has {addr}: {addrs:?}"
    );
    let routes = inspect::routes_via(&ns, "nsm-1").unwrap();
    assert!(!routes.is_empty(), "the endpoint's routes are on nsm-1");
    assert_proxied(&lab, &domain, &ns);

    // Refreshes go the same way and change nothing.
    let refreshed = nth_request(&mut nsc, 3, REQUEST)
        .unwrap_or_else(|e| panic!("NSM's client refreshes: {e}{}", domain.logs(&lab)));
    assert_eq!(client_addr(&refreshed), addr, "a refresh keeps the address");
    assert_eq!(inspect::addresses(&ns, "nsm-1").unwrap(), addrs);
    assert_proxied(&lab, &domain, &ns);
    assert!(
        !events(&nsc).iter().any(|e| e["event"] == "error"),
        "no Request failed: {:?}",
        events(&nsc)
    );

    // Close leaves nothing: not in the client, not in the endpoint's namespace.
    nsc.signal(Signal::SIGTERM);
    let status = nsc.wait(REQUEST).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        status.success() && events(&nsc).iter().any(|e| e["event"] == "closed"),
        "NSM's client closed: {}{}",
        nsc.tail(),
        domain.logs(&lab)
    );
    let gone = (0..100).find(|_| {
        let none = inspect::link(&ns, "nsm-1").unwrap().is_none();
        if !none {
            std::thread::sleep(Duration::from_millis(50));
        }
        none
    });
    assert!(gone.is_some(), "nsm-1 is gone from the client after Close");
    let after = inspect::snapshot(&lab.nse_ns).unwrap();
    let left = inspect::diff_but_idle_nse_table(&lab.nse_ns, &before, &after)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        left.is_empty(),
        "the endpoint's namespace after Close: {left:?}"
    );
}

#[test]
fn nsm_client_through_nsmgr_over_mtls_with_nsm_policies() {
    request_refresh_close(true);
}

#[test]
fn nsm_client_through_nsmgr_in_nsm_insecure_mode() {
    request_refresh_close(false);
}

/// NSM's registry keeps a name with the identity that registered it: our
/// endpoint's registration under a name another identity holds is refused
/// by NSM's policy, the refusal is reported in the endpoint's log, and
/// clients keep reaching the rightful endpoint.
#[test]
fn nsms_registry_refuses_our_name_to_another_identity() {
    let Some((lab, domain)) = lab_in_domain(true) else {
        return;
    };
    let ns = Namespace::create("mp-impostor").unwrap();
    let mut cmd = ns.command(examples::process::bin("mesh-proxy-nse"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(
            lab.identity_env("impostor", "/ns/evil/pod/impostor")
                .unwrap(),
        )
        .env("NSM_NAME", "mesh-proxy-nse")
        .env("NSM_SERVICE_NAMES", "mesh-proxy")
        .env("NSM_REGISTER_SERVICE", "false")
        .env("NSM_CIDR_PREFIX", "198.18.1.0/24")
        .env("NSM_LISTEN_ON", unix(&lab.dir.join("impostor.sock")))
        .env("NSM_STATE_DIR", lab.dir.join("impostor-state"))
        .env("NSM_CONNECT_TO", domain.url());
    let mut impostor = Process::spawn("impostor", &mut cmd, &lab.dir.join("impostor.log"))
        .unwrap_or_else(|e| panic!("{e}"));
    let line = impostor
        .wait_for_line("a refused registration", START, |l| {
            l.contains("cannot register") || l.contains(" registered ")
        })
        .unwrap_or_else(|e| panic!("{e}{}", domain.logs(&lab)));
    assert!(
        line.contains("cannot register: refused (PermissionDenied)")
            && line.contains("another identity may hold this name")
            && line.contains("no sufficient privileges"),
        "NSM's registry must refuse the name to another identity, and the endpoint say so: {line}"
    );

    // The name still leads to the endpoint that registered it first.
    let client = lab.client().unwrap();
    let mut nsc = domain.client(&lab, &client, "10m");
    let conn = nth_request(&mut nsc, 1, REQUEST)
        .unwrap_or_else(|e| panic!("NSM's client through nsmgr: {e}{}", domain.logs(&lab)));
    let nse_segment = conn["path"]["pathSegments"]
        .as_array()
        .and_then(|s| s.last())
        .cloned()
        .unwrap_or_default();
    let claims = jsonwebtoken::dangerous::insecure_decode::<Value>(
        nse_segment["token"].as_str().unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("the endpoint's token: {e}"))
    .claims;
    assert_eq!(
        claims["sub"],
        format!("spiffe://{TRUST_DOMAIN}{NSE_SPIFFE_PATH}"),
        "the rightful endpoint answered"
    );
}

/// nsmgr's heal, as NSM's own endpoints see it: our endpoint is killed
/// (SIGKILL) and started again; our forwarder notices its endpoint gone and
/// reports the connection DOWN, NSM's client heals, and its traffic goes
/// through the proxy again. Close then leaves nothing.
#[test]
fn nsm_heals_the_client_when_our_endpoint_is_killed_and_restarted() {
    let Some((mut lab, domain)) = lab_in_domain(true) else {
        return;
    };
    let ns = lab.client().unwrap();
    let mut nsc = domain.client(&lab, &ns, "10m");
    nth_request(&mut nsc, 1, REQUEST)
        .unwrap_or_else(|e| panic!("NSM's client through nsmgr: {e}{}", domain.logs(&lab)));
    assert_proxied(&lab, &domain, &ns);
    let before = requests(&nsc).len();

    let nse = lab.nse().unwrap();
    nse.signal(Signal::SIGKILL);
    nse.wait(START).unwrap_or_else(|e| panic!("{e}"));
    let log_len = nse.log().len();
    lab.start_nse()
        .unwrap_or_else(|e| panic!("{e}{}", domain.logs(&lab)));
    lab.nse()
        .unwrap()
        .wait_until("the restarted endpoint registered", START, |p| {
            p.log()[log_len..].contains(" registered ").then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}{}", domain.logs(&lab)));

    nth_request(&mut nsc, before + 1, Duration::from_secs(60)).unwrap_or_else(|e| {
        panic!(
            "NSM's client heals once the endpoint is back: {e}{}",
            domain.logs(&lab)
        )
    });
    // The heal's Request may be followed by others; traffic settles on the proxy.
    let ok = (0..50).any(|_| {
        let ex = http_get(&ns, server_addr(), IO);
        if matches!(&ex, Ok(ex) if ex.server_saw.ip() == NSE_UPLINK) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
        false
    });
    assert!(
        ok,
        "after the heal TCP goes through the proxy again{}",
        domain.logs(&lab)
    );
    assert_proxied(&lab, &domain, &ns);

    nsc.signal(Signal::SIGTERM);
    let status = nsc.wait(REQUEST).unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "NSM's client closed: {}", nsc.tail());
    let gone = (0..100).any(|_| {
        let none = inspect::link(&ns, "nsm-1").unwrap().is_none();
        if !none {
            std::thread::sleep(Duration::from_millis(50));
        }
        none
    });
    assert!(gone, "nsm-1 is gone from the client after Close");
}

/// The other way round: our nsc-init, through NSM's nsmgr (which picks our
/// forwarder), to our endpoint; the interface comes up, TCP goes through
/// the proxy, and its Close on SIGTERM leaves nothing in the client.
#[test]
fn our_nsc_init_through_nsms_nsmgr() {
    let Some((lab, domain)) = lab_in_domain(true) else {
        return;
    };
    let ns = lab.client().unwrap();
    let opts = lab.nsc_options(CLIENT).unwrap();
    let (mut nsc, up) = examples::nsc::watch(&ns, &opts, &lab.dir.join("nsc-init.log"), REQUEST)
        .unwrap_or_else(|e| panic!("nsc-init through nsmgr: {e}{}", domain.logs(&lab)));
    assert_eq!(up.iface, "nsm-1");
    let addrs = inspect::addresses(&ns, "nsm-1").unwrap();
    assert!(
        up.src.iter().all(|a| addrs.contains(a)),
        "nsm-1 has {:?}: {addrs:?}",
        up.src
    );
    assert_proxied(&lab, &domain, &ns);
    let status = nsc.terminate(REQUEST).unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "nsc-init closed: {}", nsc.tail());
    assert!(
        inspect::link(&ns, "nsm-1").unwrap().is_none(),
        "nsm-1 is gone after nsc-init's Close"
    );
}
