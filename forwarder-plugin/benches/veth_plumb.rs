//! Plumbing a veth pair into fresh namespaces: the peer created directly in
//! its namespace (IFLA_NET_NS_FD) against the classic create-then-move, and
//! `Netns::create_named` against `ip netns add`. Needs root; creates and
//! deletes its own namespaces (198.18.0.0/15, fd00::/8 only).
//!
//! `cargo bench -p forwarder-plugin --bench veth_plumb` (BENCH_RUNS=n, default 100, at least 50).

use std::process::Command;
use std::time::{Duration, Instant};

use forwarder_plugin::link::{
    AddrOptions, Links, RouteSpec, VethEnd, VethPlan, VethSpec, plumb_veth,
};
use forwarder_plugin::netns::Netns;
use ipnet::IpNet;

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// A namespace made for one run and deleted afterwards.
struct Fresh(String, Netns);

impl Fresh {
    fn new(tag: &str, run: usize) -> Fresh {
        let name = format!("bench-{tag}-{}-{run}", std::process::id());
        let ns = Netns::create_named(&name).expect("create_named");
        Fresh(name, ns)
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        let _ = Netns::delete_named(&self.0);
    }
}

const A_ADDRS: [&str; 2] = ["198.18.0.1/32", "fd00::1/128"];
const B_ADDRS: [&str; 2] = ["198.18.0.2/32", "fd00::2/128"];
const A_ROUTES: [&str; 2] = ["198.18.0.2/32", "fd00::2/128"];
const B_ROUTES: [&str; 2] = ["198.18.0.1/32", "fd00::1/128"];

fn plan(a: &Fresh, b: &Fresh) -> VethPlan {
    let end = |ns: &Fresh, name: &str, addrs: &[&str], routes: &[&str]| VethEnd {
        netns: ns.0.clone(),
        name: name.into(),
        mac: None,
        addresses: addrs.iter().map(|s| net(s)).collect(),
        routes: routes.iter().map(|s| RouteSpec::direct(net(s))).collect(),
        neighbours: vec![],
    };
    VethPlan {
        a: end(a, "nsm-a", &A_ADDRS, &A_ROUTES),
        b: end(b, "nsm-b", &B_ADDRS, &B_ROUTES),
        mtu: Some(1450),
        ipv6_nodad: true,
    }
}

/// Addresses, up, routes on both ends: the part every variant shares.
async fn configure(la: &Links, ia: u32, lb: &Links, ib: u32) {
    let opts = AddrOptions { nodad: true };
    for (l, i, addrs) in [(la, ia, A_ADDRS), (lb, ib, B_ADDRS)] {
        for a in addrs {
            l.add_address(i, net(a), opts).await.unwrap();
        }
        l.set_up(i).await.unwrap();
    }
    for (l, i, routes) in [(la, ia, A_ROUTES), (lb, ib, B_ROUTES)] {
        for r in routes {
            l.add_route(i, &RouteSpec::direct(net(r))).await.unwrap();
        }
    }
}

fn spec(mtu: u32) -> VethSpec {
    let mut s = VethSpec::new("nsm-a", "nsm-b");
    s.mtu = Some(mtu);
    s
}

#[derive(Default)]
struct Samples(Vec<Duration>);

impl Samples {
    fn stats(&mut self) -> (Duration, Duration, Duration) {
        self.0.sort();
        let n = self.0.len();
        let p99 = self.0[((n * 99).div_ceil(100)).saturating_sub(1).min(n - 1)];
        (self.0[0], self.0[n / 2], p99)
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn main() {
    let uid_root = nix::unistd::Uid::effective().is_root();
    if !uid_root {
        eprintln!("veth_plumb: needs root to create namespaces; skipped");
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
        .max(50);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let names = [
        "plumb_veth(plan): opens netns + sockets, peer in B",
        "Links: peer created in B (IFLA_NET_NS_FD)",
        "Links: created in A, then moved to B",
        "Netns::create_named",
        "ip netns add (spawn)",
    ];
    let mut samples: Vec<Samples> = names.iter().map(|_| Samples::default()).collect();

    // Interleaved, so machine noise lands on every variant alike; run 0 warms up.
    for run in 0..=runs {
        let keep = run > 0;
        let mut record = |i: usize, d: Duration| {
            if keep {
                samples[i].0.push(d);
            }
        };

        // 1. The whole high-level call.
        let (a, b) = (Fresh::new("pa", run), Fresh::new("pb", run));
        let p = plan(&a, &b);
        let t = Instant::now();
        let done = rt.block_on(plumb_veth(&p)).expect("plumb_veth");
        record(0, t.elapsed());
        assert!(done.changed);
        drop((a, b));

        // 2. and 3.: the same steps through open handles; only how the peer
        // gets into B differs.
        let (a, b) = (Fresh::new("da", run), Fresh::new("db", run));
        let d = rt.block_on(async {
            let (la, lb) = (Links::open(&a.1).unwrap(), Links::open(&b.1).unwrap());
            let t = Instant::now();
            let pair = la.add_veth(&spec(1450), &lb).await.unwrap();
            configure(&la, pair.local.index, &lb, pair.peer.index).await;
            t.elapsed()
        });
        record(1, d);
        drop((a, b));

        let (a, b) = (Fresh::new("ma", run), Fresh::new("mb", run));
        let d = rt.block_on(async {
            let (la, lb) = (Links::open(&a.1).unwrap(), Links::open(&b.1).unwrap());
            let t = Instant::now();
            let pair = la.add_veth(&spec(1450), &la).await.unwrap();
            la.move_link("nsm-b", &b.1).await.unwrap();
            let peer = lb.link("nsm-b").await.unwrap().expect("moved peer");
            configure(&la, pair.local.index, &lb, peer.index).await;
            t.elapsed()
        });
        record(2, d);
        drop((a, b));

        // 4. and 5.: namespace creation.
        let name = format!("bench-cn-{}-{run}", std::process::id());
        let t = Instant::now();
        let ns = Netns::create_named(&name).unwrap();
        record(3, t.elapsed());
        drop(ns);
        Netns::delete_named(&name).unwrap();

        let name = format!("bench-ip-{}-{run}", std::process::id());
        let t = Instant::now();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        record(4, t.elapsed());
        assert!(st.success());
        Netns::delete_named(&name).unwrap();
    }

    println!("\nveth_plumb: {runs} runs each, fresh namespaces every run (ms)\n");
    println!(
        "{:<52} {:>9} {:>9} {:>9}",
        "operation", "min", "median", "p99"
    );
    let mut medians = Vec::new();
    for (name, s) in names.iter().zip(&mut samples) {
        let (min, med, p99) = s.stats();
        medians.push(med);
        println!("{name:<52} {:>9} {:>9} {:>9}", ms(min), ms(med), ms(p99));
    }
    println!(
        "\npeer created in B vs create-then-move: {:.1}x faster (median)",
        medians[2].as_secs_f64() / medians[1].as_secs_f64()
    );
    println!(
        "create_named vs ip netns add: {:.1}x faster (median)",
        medians[4].as_secs_f64() / medians[3].as_secs_f64()
    );
}
