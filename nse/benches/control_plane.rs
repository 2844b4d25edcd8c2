//! Control-plane cost of mesh-proxy-nse alone, against a spawned release build:
//! Request+Close pairs per second and pair latency (p50/p99) at concurrency 1
//! and 64, as a forwarder calls (fresh unix connection per call) and over one
//! kept connection per worker — with placement sidecar (no rules) and, as root,
//! placement proxy (every call adds or removes the connection's interface in
//! the NSE's table, also beside 500 open connections); then resident memory
//! per 1,000 open connections. The same pairs over mTLS with SPIFFE SVIDs
//! and NSM's default policies (signed, chained tokens) show what security
//! costs per call.
//!
//! `cargo bench -p nse --bench control_plane`

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nsm_api::connection::{Connection, Mechanism, Path as NsmPath, PathSegment};
use nsm_api::grpcfd;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::networkservice::network_service_client::NetworkServiceClient;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_mesh-proxy-nse");

struct NseProcess {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
    /// The namespace a placement-proxy NSE runs in (`ip netns`), deleted on drop.
    netns: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Placement {
    /// No rules: the control plane alone, in the bench's own namespace.
    Sidecar,
    /// The mesh-proxy function's table in a namespace of its own (root
    /// only): each Request and Close changes one member of its interface set.
    Proxy,
}

impl Placement {
    fn name(self) -> &'static str {
        match self {
            Placement::Sidecar => "sidecar",
            Placement::Proxy => "proxy",
        }
    }
}

impl NseProcess {
    fn spawn(placement: Placement) -> Self {
        Self::spawn_with(placement, None)
    }

    /// With `svid`, the NSE serves mTLS (default policies) with those files.
    fn spawn_with(placement: Placement, svid: Option<&nsm_api::tls::SvidFiles>) -> Self {
        let tag = format!(
            "nse-bench-{}-{}{}",
            std::process::id(),
            placement.name(),
            if svid.is_some() { "-tls" } else { "" }
        );
        let dir = std::env::temp_dir().join(&tag);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("nse.sock");
        let config = dir.join("config.yaml");
        std::fs::write(
            &config,
            format!("version: 1\nplacement: {}\n", placement.name()),
        )
        .unwrap();
        let netns = (placement == Placement::Proxy).then(|| {
            let ok = Command::new("ip")
                .args(["netns", "add", &tag])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip netns add {tag}");
            tag.clone()
        });
        let mut cmd = match &netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        cmd.env_clear();
        match svid {
            Some(f) => cmd
                .env("NSM_SVID_CERT_FILE", &f.cert)
                .env("NSM_SVID_KEY_FILE", &f.key)
                .env("NSM_TRUST_BUNDLE_FILE", &f.bundle),
            None => cmd.env("NSM_INSECURE", "true"),
        };
        let child = cmd
            .env("NSM_CONFIG", &config)
            .env("NSM_NAME", "bench-nse")
            .env("NSM_LISTEN_ON", format!("unix://{}", socket.display()))
            // 32,768 pairs: more than the benchmark ever holds.
            .env("NSM_CIDR_PREFIX", "198.18.0.0/16")
            .env("NSM_LOG_LEVEL", "WARN")
            .env("NSM_STATE_DIR", dir.join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mesh-proxy-nse");
        NseProcess {
            child,
            socket,
            dir,
            netns,
        }
    }

    fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS")
    }

    /// Anonymous resident memory: what connections allocate (the rest is
    /// the binary's pages).
    fn anon_kib(&self) -> u64 {
        self.status_kib("RssAnon")
    }

    fn status_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{key}"))
    }
}

impl Drop for NseProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(ns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

async fn wait_ready(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((ch, _)) = grpcfd::dial(socket).await {
            let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
            let req = tonic_health::pb::HealthCheckRequest {
                service: "networkservice.NetworkService".into(),
            };
            if health.check(req).await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "NSE not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn seg(name: &str, id: &str) -> PathSegment {
    PathSegment {
        name: name.into(),
        id: id.into(),
        token: format!("token-{name}"),
        expires: Some(nsm_api::path::to_timestamp(
            SystemTime::now() + Duration::from_secs(600),
        )),
        ..Default::default()
    }
}

/// A forwarder's Request for connection number `n`.
fn request(n: u64) -> tonic::Request<NetworkServiceRequest> {
    let f2 = format!("f2-{n}");
    let mech = |t: &str| Mechanism {
        cls: "LOCAL".into(),
        r#type: t.into(),
        ..Default::default()
    };
    let msg = NetworkServiceRequest {
        connection: Some(Connection {
            id: f2.clone(),
            network_service: "mesh-proxy".into(),
            labels: [("app".to_string(), "bench".to_string())].into(),
            path: Some(NsmPath {
                index: 2,
                path_segments: vec![
                    seg("nsc", &format!("c0-{n}")),
                    seg("nsmgr", &format!("m1-{n}")),
                    seg("fwd", &f2),
                ],
            }),
            ..Default::default()
        }),
        mechanism_preferences: vec![mech("MEMIF"), mech("KERNEL")],
    };
    let mut msg = msg;
    // As `forwarder-plugin serve` asks: placement sidecar is served only to
    // a forwarder that applies client rules.
    if let Some(c) = msg.connection.as_mut() {
        forwarder_plugin::hop::announce_features(c);
    }
    with_metadata(msg)
}

fn with_metadata<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    let expires =
        chrono::DateTime::<chrono::Utc>::from(SystemTime::now() + Duration::from_secs(600))
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    r.metadata_mut()
        .insert("nsm-client-token", "bench-token".parse().unwrap());
    r.metadata_mut()
        .insert("nsm-client-token-expires", expires.parse().unwrap());
    r.set_timeout(Duration::from_secs(15));
    r
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// A new unix connection for every call, as NSM forwarders dial.
    FreshConnection,
    /// One connection per worker for all its calls.
    KeptConnection,
}

async fn client(socket: &Path) -> NetworkServiceClient<Channel> {
    let (ch, _) = grpcfd::dial(socket).await.expect("dial");
    NetworkServiceClient::new(ch)
}

/// One Request+Close pair; returns its latency.
async fn pair(socket: &Path, kept: Option<&mut NetworkServiceClient<Channel>>, n: u64) -> Duration {
    let start = Instant::now();
    match kept {
        Some(c) => {
            let conn = c.request(request(n)).await.expect("Request").into_inner();
            c.close(with_metadata(conn)).await.expect("Close");
        }
        None => {
            let conn = client(socket)
                .await
                .request(request(n))
                .await
                .expect("Request")
                .into_inner();
            client(socket)
                .await
                .close(with_metadata(conn))
                .await
                .expect("Close");
        }
    }
    start.elapsed()
}

struct Row {
    placement: &'static str,
    mode: &'static str,
    concurrency: usize,
    pairs: usize,
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

async fn run(nse: &NseProcess, mode: Mode, concurrency: usize, pairs: usize) -> Row {
    let socket = nse.socket.as_path();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (socket, next) = (socket.to_owned(), next.clone());
            tokio::spawn(async move {
                let mut kept = match mode {
                    Mode::KeptConnection => Some(client(&socket).await),
                    Mode::FreshConnection => None,
                };
                let mut lat = Vec::new();
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= pairs as u64 {
                        return lat;
                    }
                    lat.push(pair(&socket, kept.as_mut(), n).await);
                }
            })
        })
        .collect();
    let placement = if nse.netns.is_some() {
        "proxy"
    } else {
        "sidecar"
    };
    let mode = match mode {
        Mode::FreshConnection => "fresh conn/call",
        Mode::KeptConnection => "kept conn",
    };
    tally(workers, start, placement, mode, concurrency).await
}

/// The workers' latencies as a row: pairs/s over the wall time since
/// `start`, p50 and p99.
async fn tally(
    workers: Vec<tokio::task::JoinHandle<Vec<Duration>>>,
    start: Instant,
    placement: &'static str,
    mode: &'static str,
    concurrency: usize,
) -> Row {
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(w.await.unwrap());
    }
    let wall = start.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    Row {
        placement,
        mode,
        concurrency,
        pairs: lat.len(),
        per_sec: lat.len() as f64 / wall.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

/// Opens `count` connections (16 at a time) numbered from `first`; returns them.
async fn open(socket: &Path, first: u64, count: u64) -> Vec<Connection> {
    let mut out = Vec::with_capacity(count as usize);
    let ids: Vec<u64> = (first..first + count).collect();
    for chunk in ids.chunks(16) {
        let calls: Vec<_> = chunk
            .iter()
            .map(|&n| {
                let socket = socket.to_owned();
                tokio::spawn(async move {
                    client(&socket)
                        .await
                        .request(request(n))
                        .await
                        .expect("Request")
                        .into_inner()
                })
            })
            .collect();
        for c in calls {
            out.push(c.await.unwrap());
        }
    }
    out
}

/// The forwarder's side of the mTLS rows: its SVID, its tokens, and the
/// client's segment-0 token made out to it.
struct Secure {
    dialer: nsm_api::transport::Dialer,
    tokens: nsm_api::token::TokenIssuer,
    nsc_token: String,
}

impl Secure {
    fn new(ca: &examples::svid::TestCa, socket: &Path) -> Secure {
        use nsm_api::tls::Identity;
        let id = |p: &str| Identity::new(ca.material(&ca.issue(p).unwrap()).unwrap());
        let (fwd, nsc) = (id("/fwd"), id("/nsc"));
        let m = fwd.current();
        let fwd_peer = nsm_api::tls::PeerSvid {
            id: m.id.clone(),
            not_after: m.not_after,
            leaf: m.leaf.clone(),
        };
        Secure {
            dialer: nsm_api::transport::Dialer::new(
                nsm_api::transport::Target::Unix(socket.to_owned()),
                Duration::from_secs(5),
            )
            .with_tls(Some(&fwd))
            .unwrap(),
            tokens: nsm_api::token::TokenIssuer::svid(fwd.clone(), Duration::from_secs(600)),
            nsc_token: nsm_api::token::TokenIssuer::svid(nsc, Duration::from_secs(600))
                .issue_for(Some(&fwd_peer))
                .unwrap()
                .jwt,
        }
    }

    /// One Request+Close pair, each on a fresh mTLS connection.
    async fn pair(&self, n: u64) -> Duration {
        let start = Instant::now();
        let mut msg = request(n).into_inner();
        if let Some(path) = msg.connection.as_mut().and_then(|c| c.path.as_mut()) {
            path.path_segments.remove(1);
            path.index = 1;
            path.path_segments[0].token = self.nsc_token.clone();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let conn = self
            .dialer
            .request(msg, &self.tokens, deadline)
            .await
            .expect("Request over mTLS")
            .conn;
        self.dialer
            .close(conn, &self.tokens, deadline)
            .await
            .expect("Close over mTLS");
        start.elapsed()
    }
}

async fn run_secure(secure: Arc<Secure>, concurrency: usize, pairs: usize) -> Row {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (secure, next) = (secure.clone(), next.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= pairs as u64 {
                        return lat;
                    }
                    lat.push(secure.pair(3_000_000 + n).await);
                }
            })
        })
        .collect();
    tally(workers, start, "sidecar", "mTLS+policies", concurrency).await
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let nse = NseProcess::spawn(Placement::Sidecar);
    wait_ready(&nse.socket).await;
    run(&nse, Mode::FreshConnection, 8, 500).await; // warm-up

    let mut rows = Vec::new();
    for mode in [Mode::FreshConnection, Mode::KeptConnection] {
        rows.push(run(&nse, mode, 1, 2_000).await);
        rows.push(run(&nse, mode, 64, 10_000).await);
    }
    // The same fresh-connection pairs over mTLS, tokens signed and checked.
    {
        let ca = examples::svid::TestCa::new("k8s.nsm").unwrap();
        let dir = std::env::temp_dir().join(format!("nse-bench-svid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = ca.write(&ca.issue("/nse").unwrap(), &dir).unwrap();
        let tls_nse = NseProcess::spawn_with(Placement::Sidecar, Some(&files));
        let secure = Arc::new(Secure::new(&ca, &tls_nse.socket));
        let end = Instant::now() + Duration::from_secs(10);
        while !tls_nse.socket.exists() {
            assert!(Instant::now() < end, "the mTLS NSE did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        run_secure(secure.clone(), 8, 300).await; // warm-up
        rows.push(run_secure(secure.clone(), 1, 1_000).await);
        rows.push(run_secure(secure, 64, 5_000).await);
        let _ = std::fs::remove_dir_all(&dir);
    }
    // Placement proxy: every Request and Close changes the one table of
    // the NSE's namespace (needs root for the namespace and the rules).
    let mut with_open = None;
    if nix_is_root() {
        let proxy = NseProcess::spawn(Placement::Proxy);
        wait_ready(&proxy.socket).await;
        run(&proxy, Mode::FreshConnection, 4, 100).await; // warm-up
        rows.push(run(&proxy, Mode::FreshConnection, 1, 300).await);
        rows.push(run(&proxy, Mode::FreshConnection, 64, 1_000).await);
        // The set grows with the live connections: pairs beside 500 open ones.
        let held = open(&proxy.socket, 2_000_000, 500).await;
        let mut r = run(&proxy, Mode::FreshConnection, 1, 200).await;
        r.mode = "fresh, 500 open";
        with_open = Some(r);
        for c in held {
            client(&proxy.socket)
                .await
                .close(with_metadata(c))
                .await
                .expect("Close");
        }
    } else {
        println!("(not root: placement proxy rows skipped)");
    }
    rows.extend(with_open);
    println!(
        "\nmesh-proxy-nse control plane: Request+Close pairs (2 CPUs shared by client and NSE)\n"
    );
    println!(
        "{:<9} {:<16} {:>11} {:>7} {:>10} {:>9} {:>9}",
        "placement", "mode", "concurrency", "pairs", "pairs/s", "p50 ms", "p99 ms"
    );
    for r in &rows {
        println!(
            "{:<9} {:<16} {:>11} {:>7} {:>10.0} {:>9} {:>9}",
            r.placement,
            r.mode,
            r.concurrency,
            r.pairs,
            r.per_sec,
            ms(r.p50),
            ms(r.p99)
        );
    }

    // Memory: connections held open (each with begin/monitor/IPAM state and an expiry timer).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = nse.rss_kib();
    let base_anon = nse.anon_kib();
    let mut held = Vec::new();
    let mut rss = vec![(0u64, base)];
    for step in 1..=5u64 {
        held.extend(open(&nse.socket, 1_000_000 + (step - 1) * 1_000, 1_000).await);
        rss.push((held.len() as u64, nse.rss_kib()));
    }
    let (n, top) = *rss.last().unwrap();
    let one = prost::Message::encoded_len(&held[0]);
    println!("\nmesh-proxy-nse RSS (VmRSS) with open connections\n");
    println!("{:>12} {:>10}", "connections", "RSS KiB");
    for (n, kib) in &rss {
        println!("{n:>12} {kib:>10}");
    }
    println!(
        "\nRSS per 1,000 open connections: {:.0} KiB ({} → {} KiB over {n})",
        (top - base) as f64 * 1000.0 / n as f64,
        base,
        top
    );
    println!("(one returned connection is {one} bytes of protobuf)");
    for c in held {
        client(&nse.socket)
            .await
            .close(with_metadata(c))
            .await
            .expect("Close");
    }
    let top_anon = nse.anon_kib();
    // The endpoint's upkeep returns freed memory (each second, and once
    // more a few seconds later, when the burst's threads have gone).
    tokio::time::sleep(Duration::from_secs(6)).await;
    println!("RSS after closing them all: {} KiB", nse.rss_kib());
    println!(
        "anonymous: {base_anon} KiB with none, {top_anon} KiB with {n}, {} KiB after closing them all",
        nse.anon_kib()
    );
}
