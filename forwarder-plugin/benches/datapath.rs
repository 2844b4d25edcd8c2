//! What our redirect rules cost the traffic they touch, side by side in
//! one run: a client namespace and a server namespace joined by a veth;
//! in the client namespace, per case,
//!   direct              no rules at all
//!   ours, excluded      our nft rules (istio's defaults), the server's port
//!                       excluded (`excludeOutboundPorts`): not redirected
//!   istio, excluded     the same rules as istio-iptables writes them (our
//!                       iptables backend renders istio's rule lines)
//!   ours, redirected    our nft rules, the traffic through HAProxy (uid 1337)
//!   istio, redirected   the iptables rules, through the same HAProxy
//! Two measures: request/response round trips of 64 bytes on one kept TCP
//! connection (µs), and new connections per second (connect, one round
//! trip, close). Client, server and proxy are pinned to CPU 0 (on few
//! vCPUs, cross-CPU wake-ups hide everything), and the cases are
//! interleaved round by round so machine noise hits each alike; medians of
//! the rounds are reported, with each case's ratio to `direct`.
//!
//! Needs root and HAProxy. `DATAPATH_ROUNDS` (default 15), `DATAPATH_RR`
//! (round trips per sample, default 2000), `DATAPATH_CONNS` (connections
//! per sample, default 300).
//!
//! cargo bench -p forwarder-plugin --bench datapath

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use forwarder_plugin::netns::Netns;
use forwarder_plugin::rules::{self, BackendKind, BackendOptions, Plan, RedirectSpec};
use nsm_api::contract::redirect::Port;

const CLIENT_IP: &str = "198.18.240.1";
const SERVER_IP: &str = "198.18.240.2";
const SERVER_PORT: u16 = 9000;
const SIZE: usize = 64;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Pins the calling thread to CPU 0.
fn pin() {
    let mut set = nix::sched::CpuSet::new();
    set.set(0).expect("cpu 0");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("pin to cpu 0");
}

/// Named namespaces deleted on drop.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Netns::delete_named(n);
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An echo server in `ns` (one connection at a time, as the client makes
/// them): every 64 bytes read are written back.
fn serve(ns: &Netns) {
    let addr: SocketAddr = format!("{SERVER_IP}:{SERVER_PORT}").parse().unwrap();
    let listener = ns
        .run(move || TcpListener::bind(addr))
        .expect("enter the server namespace")
        .expect("bind the server");
    std::thread::spawn(move || {
        pin();
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; SIZE];
            while s.read_exact(&mut buf).is_ok() {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
        }
    });
}

/// Mean round trip (µs) over `n` on one connection, from `ns`.
fn round_trips(ns: &Netns, n: usize) -> f64 {
    ns.run(move || {
        pin();
        let to: SocketAddr = format!("{SERVER_IP}:{SERVER_PORT}").parse().unwrap();
        let mut s = TcpStream::connect(to).expect("connect");
        s.set_nodelay(true).unwrap();
        let (msg, mut buf) = ([7u8; SIZE], [0u8; SIZE]);
        // Warm-up.
        for _ in 0..50 {
            s.write_all(&msg).unwrap();
            s.read_exact(&mut buf).unwrap();
        }
        let t0 = Instant::now();
        for _ in 0..n {
            s.write_all(&msg).unwrap();
            s.read_exact(&mut buf).unwrap();
        }
        t0.elapsed().as_secs_f64() * 1e6 / n as f64
    })
    .expect("enter the client namespace")
}

/// New connections per second (connect, one round trip, close), from `ns`.
fn connection_rate(ns: &Netns, n: usize) -> f64 {
    ns.run(move || {
        pin();
        let to: SocketAddr = format!("{SERVER_IP}:{SERVER_PORT}").parse().unwrap();
        let (msg, mut buf) = ([7u8; SIZE], [0u8; SIZE]);
        let t0 = Instant::now();
        for _ in 0..n {
            let mut s = TcpStream::connect(to).expect("connect");
            s.set_nodelay(true).unwrap();
            s.write_all(&msg).unwrap();
            s.read_exact(&mut buf).unwrap();
        }
        n as f64 / t0.elapsed().as_secs_f64()
    })
    .expect("enter the client namespace")
}

fn haproxy() -> Option<PathBuf> {
    ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// HAProxy in `ns` on 15001/15006 as uid 1337, pinned to CPU 0, relaying
/// to each connection's original destination.
fn start_proxy(ns: &Netns, bin: &Path, dir: &Path) -> Child {
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        "global\n    uid 1337\n    gid 1337\n    maxconn 4096\n\ndefaults\n    mode tcp\n    \
         timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\n\
         frontend capture\n    bind :15001\n    bind :15006\n    default_backend original\n\n\
         backend original\n    server original 0.0.0.0:0\n",
    )
    .unwrap();
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"])
        .arg(bin)
        .args(["-db", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ns.enter_in_child(&mut cmd);
    let child = cmd.spawn().expect("start haproxy");
    let up = (0..200).any(|_| {
        let ok = ns
            .run(|| TcpStream::connect(("127.0.0.1", 15001)).is_ok())
            .unwrap_or(false);
        if !ok {
            std::thread::sleep(Duration::from_millis(20));
        }
        ok
    });
    assert!(up, "haproxy does not listen on 15001");
    child
}

struct Case {
    name: &'static str,
    /// The rules and their backend; `None`: no rules.
    rules: Option<(BackendKind, Plan)>,
    rtt_us: Vec<f64>,
    conns_per_s: Vec<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("datapath: needs root (creates network namespaces); skipped");
        return;
    }
    let Some(haproxy) = haproxy() else {
        eprintln!("datapath: needs HAProxy (apt-get install haproxy); skipped");
        return;
    };
    let (rounds, rr, conns) = (
        env_or("DATAPATH_ROUNDS", 15),
        env_or("DATAPATH_RR", 2000),
        env_or("DATAPATH_CONNS", 300),
    );
    let pid = std::process::id();
    let (cname, sname) = (format!("dpc{pid}"), format!("dps{pid}"));
    let _guard = Namespaces(vec![cname.clone(), sname.clone()]);
    let client = Netns::create_named(&cname).expect("client namespace");
    let server = Netns::create_named(&sname).expect("server namespace");
    ip(&[
        "-n", &cname, "link", "add", "dp0", "type", "veth", "peer", "name", "dp1", "netns", &sname,
    ]);
    ip(&[
        "-n",
        &cname,
        "addr",
        "add",
        &format!("{CLIENT_IP}/24"),
        "dev",
        "dp0",
    ]);
    ip(&[
        "-n",
        &sname,
        "addr",
        "add",
        &format!("{SERVER_IP}/24"),
        "dev",
        "dp1",
    ]);
    for (ns, link) in [(&cname, "dp0"), (&sname, "dp1")] {
        ip(&["-n", ns, "link", "set", link, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    serve(&server);

    let redirected = Plan::new(&RedirectSpec::default()).expect("istio's defaults");
    let excluded = Plan::new(&RedirectSpec {
        exclude_outbound_ports: vec![Port(SERVER_PORT)],
        ..Default::default()
    })
    .expect("defaults with an excluded port");
    let mut cases = vec![
        Case {
            name: "direct (no rules)",
            rules: None,
            rtt_us: Vec::new(),
            conns_per_s: Vec::new(),
        },
        Case {
            name: "ours (nft), excluded",
            rules: Some((BackendKind::Nft, excluded.clone())),
            rtt_us: Vec::new(),
            conns_per_s: Vec::new(),
        },
        Case {
            name: "istio-style (iptables), excluded",
            rules: Some((BackendKind::Iptables, excluded)),
            rtt_us: Vec::new(),
            conns_per_s: Vec::new(),
        },
        Case {
            name: "ours (nft), redirected via HAProxy",
            rules: Some((BackendKind::Nft, redirected.clone())),
            rtt_us: Vec::new(),
            conns_per_s: Vec::new(),
        },
        Case {
            name: "istio-style (iptables), redirected via HAProxy",
            rules: Some((BackendKind::Iptables, redirected)),
            rtt_us: Vec::new(),
            conns_per_s: Vec::new(),
        },
    ];
    let dir = std::env::temp_dir().join(format!("datapath-{pid}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut proxy = start_proxy(&client, &haproxy, &dir);
    eprintln!(
        "datapath: {rounds} rounds of {} cases; per sample {rr} round trips of {SIZE} bytes and {conns} connections; all pinned to CPU 0",
        cases.len()
    );
    for _ in 0..rounds {
        for case in &mut cases {
            let backend = case.rules.as_ref().map(|(kind, plan)| {
                let b = rules::get_backend(*kind, BackendOptions::default());
                b.apply(&client, plan).expect("apply the rules");
                b
            });
            case.rtt_us.push(round_trips(&client, rr));
            case.conns_per_s.push(connection_rate(&client, conns));
            if let Some(b) = backend {
                b.cleanup(&client).expect("remove the rules");
            }
            // Connections in TIME_WAIT from this case do not slow the next.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
    let _ = std::fs::remove_dir_all(&dir);

    println!();
    println!(
        "{:<48} {:>10} {:>9} {:>12} {:>9}",
        "case (medians of the rounds)", "RTT µs", "× direct", "conns/s", "× direct"
    );
    let (mut base_rtt, mut base_cr) = (0.0, 0.0);
    for (i, case) in cases.iter_mut().enumerate() {
        let (rtt, cr) = (median(&mut case.rtt_us), median(&mut case.conns_per_s));
        if i == 0 {
            (base_rtt, base_cr) = (rtt, cr);
        }
        println!(
            "{:<48} {:>10.1} {:>9.2} {:>12.0} {:>9.2}",
            case.name,
            rtt,
            rtt / base_rtt,
            cr,
            cr / base_cr
        );
    }
    println!();
    println!("goal: excluded traffic ≤ +5% latency and ≥ 0.95× connection rate of direct");
}
