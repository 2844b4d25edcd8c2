//! End-to-end connection setup ("request → interface ready") through
//! `forwarder-plugin serve` and `mesh-proxy-nse`, measured two ways:
//!
//! * **nsc-init**: from starting `nsc-init` in a client namespace until it
//!   exits 0, which it does once the interface is up with its addresses.
//!   Includes nsc-init's own start (exec, an ES256 key, a runtime, a dial):
//!   what a pod's init container pays.
//! * **endpoint** (`E2E_BENCH_MODES=endpoint`): the same client against the
//!   endpoint's socket, without the forwarder: the endpoint's share.
//! * **direct**: an in-process client ([`examples::direct_client`]) dials the
//!   forwarder, sends the Request with the namespace fd, and checks the
//!   interface over rtnetlink: what the forwarder, the endpoint and the
//!   kernel cost, without a process start.
//!
//! For each: 1 client at a time (p50/p99), 50 clients at once (p50/p99 of
//! each client's own setup), and 1,000 connections one after another, all
//! kept (total; the 10th against the 1,000th setup). Client namespaces are
//! made beforehand and not timed. A fresh lab per scenario.
//!
//! Goals: p50 ≤ 5 ms, p99 ≤ 20 ms, 1,000th ≤ 1.5 × the 10th.
//! Needs root and release binaries:
//! `cargo build --release --workspace --bins && cargo bench -p examples --bench e2e_setup`.
//! Environment: `E2E_BENCH_CONNECTIONS` (default 1000), `E2E_BENCH_SAMPLES`
//! (default 100), `E2E_BENCH_MODES` (default `nsc-init,direct`; also `endpoint`),
//! `E2E_BENCH_PLACEMENT` (`proxy`, the default, or `sidecar`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use examples::direct_client::{DirectClient, interface_ready};
use examples::lab::{Lab, LabConfig};
use examples::namespace::Namespace;
use examples::nsc;
use examples::proxy::ProxyKind;
use forwarder_plugin::link::Links;

const CONCURRENT: usize = 50;
const CONCURRENT_ROUNDS: usize = 4;
const WARMUP: usize = 5;
const SERVICE: &str = "mesh-proxy";
const IFACE: &str = "nsm-1";
const PLACEMENT_LABEL: &str = "proxy-placement";

type Setup = Result<Duration, String>;
/// One scenario of a run: prints its figures, or says why it stopped.
type Scenario<'a> = dyn Fn() -> Result<(), String> + 'a;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    NscInit,
    Direct,
    /// The direct client against the endpoint's socket, no forwarder: what
    /// the endpoint alone costs (nothing is plumbed, so no interface check).
    Endpoint,
}

/// What every setup of a run asks for.
struct Runner {
    rt: tokio::runtime::Runtime,
    mode: Mode,
    placement: String,
}

impl Runner {
    fn name(&self) -> String {
        let mode = match self.mode {
            Mode::NscInit => "nsc-init",
            Mode::Direct => "direct",
            Mode::Endpoint => "endpoint-only",
        };
        format!("{mode}/{}", self.placement)
    }

    /// A fresh lab, so earlier connections do not weigh on later ones.
    fn lab(&self) -> Result<(Lab, Arc<DirectClient>), String> {
        let lab = Lab::start(LabConfig {
            proxy: ProxyKind::Builtin,
            // Room for thousands of point-to-point pairs.
            cidr_prefix: "198.18.0.0/16".into(),
            log_level: "WARN".into(),
            ..Default::default()
        })
        .map_err(|e| format!("lab: {e}"))?;
        let socket = match self.mode {
            Mode::Endpoint => lab.nse_socket(),
            _ => lab.forwarder_socket(),
        };
        let identity = lab
            .identity("/ns/default/pod/bench")
            .map_err(|e| format!("client SVID: {e}"))?;
        let client = DirectClient::new(
            &socket,
            "bench",
            Duration::from_secs(600),
            identity.as_ref(),
        )
        .map_err(|e| format!("client: {e}"))?;
        Ok((lab, Arc::new(client)))
    }

    fn clients(&self, lab: &Lab, n: usize) -> Result<Vec<Namespace>, String> {
        (0..n)
            .map(|_| lab.client().map_err(|e| format!("client namespace: {e}")))
            .collect()
    }

    fn nsc_setup(&self, lab: &Lab, ns: &Namespace, id: &str) -> Setup {
        let mut opts = lab.nsc_options(id).expect("a client SVID");
        opts.log_level = "WARN".into();
        opts.services = format!(
            "kernel://{SERVICE}/{IFACE}?{PLACEMENT_LABEL}={}",
            self.placement
        );
        let run = nsc::run(ns, &opts).map_err(|e| format!("nsc-init: {e}"))?;
        if !run.status.success() {
            return Err(run.reason().to_owned());
        }
        Ok(run.elapsed)
    }

    /// One setup in `ns`, timed.
    fn setup(&self, lab: &Lab, client: &Arc<DirectClient>, ns: &Namespace, id: &str) -> Setup {
        match self.mode {
            Mode::NscInit => self.nsc_setup(lab, ns, id),
            Mode::Direct | Mode::Endpoint => {
                let placement = self.placement.clone();
                let check = self.mode == Mode::Direct;
                self.rt.block_on(direct_setup(
                    client.clone(),
                    ns,
                    id.to_owned(),
                    placement,
                    check,
                ))
            }
        }
    }

    /// `namespaces.len()` setups started together.
    fn concurrent(
        &self,
        lab: &Lab,
        client: &Arc<DirectClient>,
        namespaces: &[Namespace],
        round: usize,
    ) -> Vec<Setup> {
        match self.mode {
            Mode::NscInit => {
                let barrier = std::sync::Barrier::new(namespaces.len());
                std::thread::scope(|s| {
                    let handles: Vec<_> = namespaces
                        .iter()
                        .enumerate()
                        .map(|(i, ns)| {
                            let barrier = &barrier;
                            s.spawn(move || {
                                barrier.wait();
                                self.nsc_setup(lab, ns, &format!("r{round}c{i}"))
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| {
                            h.join()
                                .unwrap_or_else(|_| Err("client thread panicked".into()))
                        })
                        .collect()
                })
            }
            Mode::Direct | Mode::Endpoint => self.rt.block_on(async {
                let barrier = Arc::new(tokio::sync::Barrier::new(namespaces.len()));
                let mut set = tokio::task::JoinSet::new();
                for (i, ns) in namespaces.iter().enumerate() {
                    let Ok(netns) = ns.netns().try_clone() else {
                        return vec![Err("cannot duplicate a netns fd".into())];
                    };
                    let (client, barrier) = (client.clone(), barrier.clone());
                    let placement = self.placement.clone();
                    let id = format!("r{round}c{i}");
                    let check = self.mode == Mode::Direct;
                    set.spawn(async move {
                        let links = Links::open(&netns).map_err(|e| e.to_string())?;
                        barrier.wait().await;
                        let labels = [(PLACEMENT_LABEL, placement.as_str())];
                        let start = Instant::now();
                        client
                            .request(&netns, &id, SERVICE, IFACE, &labels)
                            .await
                            .map_err(|e| format!("Request {id}: {e}"))?;
                        if check {
                            interface_ready(&links, IFACE)
                                .await
                                .map_err(|e| format!("{id}: {e}"))?;
                        }
                        Ok(start.elapsed())
                    });
                }
                let mut out = Vec::new();
                while let Some(t) = set.join_next().await {
                    out.push(t.unwrap_or_else(|e| Err(format!("client task: {e}"))));
                }
                out
            }),
        }
    }
}

async fn direct_setup(
    client: Arc<DirectClient>,
    ns: &Namespace,
    id: String,
    placement: String,
    check: bool,
) -> Setup {
    let links =
        Links::open(ns.netns()).map_err(|e| format!("netlink in the client namespace: {e}"))?;
    let labels = [(PLACEMENT_LABEL, placement.as_str())];
    let start = Instant::now();
    client
        .request(ns.netns(), &id, SERVICE, IFACE, &labels)
        .await
        .map_err(|e| format!("Request {id}: {e}"))?;
    if check {
        interface_ready(&links, IFACE)
            .await
            .map_err(|e| format!("{id}: {e}"))?;
    }
    Ok(start.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISSED" }
}

fn report(label: &str, samples: &mut [Duration]) {
    samples.sort();
    let (p50, p99) = (percentile(samples, 0.5), percentile(samples, 0.99));
    println!(
        "{label:<42} n={:<5} p50 {:>9} ({:<6} ≤ 5 ms)  p99 {:>9} ({:<6} ≤ 20 ms)  max {:>9}",
        samples.len(),
        ms(p50),
        verdict(p50 <= Duration::from_millis(5)),
        ms(p99),
        verdict(p99 <= Duration::from_millis(20)),
        ms(*samples.last().unwrap_or(&Duration::ZERO)),
    );
}

fn one_at_a_time(runner: &Runner, samples: usize) -> Result<(), String> {
    let (lab, client) = runner.lab()?;
    let namespaces = runner.clients(&lab, WARMUP + samples)?;
    let mut times = Vec::new();
    for (i, ns) in namespaces.iter().enumerate() {
        let t = runner.setup(&lab, &client, ns, &format!("one{i}"))?;
        if i >= WARMUP {
            times.push(t);
        }
    }
    report(
        &format!("{}: 1 client at a time", runner.name()),
        &mut times,
    );
    Ok(())
}

fn fifty_at_once(runner: &Runner) -> Result<(), String> {
    let (lab, client) = runner.lab()?;
    let mut keep = Vec::new();
    let mut times = Vec::new();
    for round in 0..CONCURRENT_ROUNDS {
        let namespaces = runner.clients(&lab, CONCURRENT)?;
        for r in runner.concurrent(&lab, &client, &namespaces, round) {
            times.push(r?);
        }
        keep.extend(namespaces);
    }
    report(
        &format!("{}: {CONCURRENT} clients at once", runner.name()),
        &mut times,
    );
    Ok(())
}

fn many(runner: &Runner, connections: usize) -> Result<(), String> {
    let (lab, client) = runner.lab()?;
    let namespaces = runner.clients(&lab, connections)?;
    let mut times = Vec::with_capacity(connections);
    let start = Instant::now();
    let mut failure = None;
    let mut total = Duration::ZERO;
    for (i, ns) in namespaces.iter().enumerate() {
        match runner.setup(&lab, &client, ns, &format!("m{i}")) {
            Ok(t) => {
                times.push(t);
                // Up to the last success: a refused Request may take long to say so.
                total = start.elapsed();
            }
            Err(e) => {
                failure = Some(format!("connection {} failed: {e}", i + 1));
                break;
            }
        }
    }
    let name = runner.name();
    let n = times.len();
    println!(
        "{name}: {n} connections one after another, all kept: total {:.2} s ({} each)",
        total.as_secs_f64(),
        ms(total / n.max(1) as u32)
    );
    if n >= 10 {
        let around = |i: usize| {
            let mut w = times[i.saturating_sub(5)..(i + 5).min(n)].to_vec();
            w.sort();
            percentile(&w, 0.5)
        };
        let (tenth, last) = (times[9], times[n - 1]);
        let (m10, mlast) = (around(9), around(n - 1));
        let ratio = last.as_secs_f64() / tenth.as_secs_f64();
        let mratio = mlast.as_secs_f64() / m10.as_secs_f64();
        println!(
            "{name}:   10th {}  {n}th {}  ratio {ratio:.2} ({} ≤ 1.5); medians of the ten around each {} vs {}, ratio {mratio:.2} ({})",
            ms(tenth),
            ms(last),
            verdict(ratio <= 1.5),
            ms(m10),
            ms(mlast),
            verdict(mratio <= 1.5),
        );
        report(&format!("{name}: all {n}"), &mut times.clone());
    }
    let t = Instant::now();
    drop(lab);
    drop(namespaces);
    println!(
        "{name}:   teardown of {n} connections and their namespaces: {:.2} s",
        t.elapsed().as_secs_f64()
    );
    failure.map_or(Ok(()), Err)
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("e2e_setup: needs root (namespaces, veths); skipped");
        return;
    }
    let samples = env_usize("E2E_BENCH_SAMPLES", 100);
    let connections = env_usize("E2E_BENCH_CONNECTIONS", 1000).max(10);
    let modes = std::env::var("E2E_BENCH_MODES").unwrap_or_else(|_| "nsc-init,direct".into());
    let placement = std::env::var("E2E_BENCH_PLACEMENT").unwrap_or_else(|_| "proxy".into());
    println!("end-to-end setup, request → interface ready (release build, builtin proxy, nft)");
    let mut failed = false;
    for mode in modes.split(',') {
        let mode = match mode.trim() {
            "nsc-init" => Mode::NscInit,
            "direct" => Mode::Direct,
            "endpoint" => Mode::Endpoint,
            other => {
                panic!("E2E_BENCH_MODES: unknown mode {other:?} (nsc-init, direct, endpoint)")
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let runner = Runner {
            rt,
            mode,
            placement: placement.clone(),
        };
        let scenarios: [(&str, &Scenario<'_>); 3] = [
            ("1 at a time", &|| one_at_a_time(&runner, samples)),
            ("50 at once", &|| fifty_at_once(&runner)),
            ("many", &|| many(&runner, connections)),
        ];
        for (what, run) in scenarios {
            if let Err(e) = run() {
                println!("{}: {what}: FAILED: {e}", runner.name());
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
