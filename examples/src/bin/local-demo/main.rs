//! local-demo: the whole path on one machine. A client namespace with a
//! pod's own network (eth0, a default route via a "node", the cluster DNS)
//! asks for the `mesh-proxy` network service with nsc-init;
//! `forwarder-plugin serve` plumbs it to `mesh-proxy-nse`, whose namespace
//! holds the mesh proxy and the link to a server; the TCP the client starts
//! reaches the server through the proxy while its DNS and the node's probes
//! keep their own way; Close takes everything away again. Run as root (see
//! examples/README.md); exits 0 after a final `demo: OK` line.

#![forbid(unsafe_code)]

mod injected;

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use examples::cancel;
use examples::dns::{self, DnsError};
use examples::inspect::{self, InspectError, NsState};
use examples::lab::{
    CLUSTER_DNS, CLUSTER_DNS_ANSWER, Lab, LabConfig, LabError, NODE_IP, NSE_UPLINK, PodNetwork,
    SERVER_TO_NSE, server_addr,
};
use examples::namespace::Namespace;
use examples::nsc::NscError;
use examples::process::{self, Process, ProcessError};
use examples::proxy::ProxyKind;
use examples::traffic::{TrafficError, http_get};
use examples::vpn_peer::{self, VpnKeys, VpnPeer, VpnPeerError};

#[derive(Parser)]
#[command(
    name = "local-demo",
    about = "Local demo: client → forwarder → mesh-proxy endpoint + proxy → server, then Close (run as root)"
)]
struct Args {
    /// Which proxy runs in the endpoint's namespace: haproxy (Debian's), builtin (examples' transparent-proxy) or auto (haproxy if installed).
    #[arg(long, default_value = "auto")]
    proxy: ProxyKind,
    /// Requests to send through the proxy.
    #[arg(long, default_value_t = 3)]
    requests: u32,
    /// After the requests, wait for Enter before Closing, to look around
    /// (e.g. `ip netns exec <client> curl http://198.19.100.2:8080/`).
    #[arg(long)]
    hold: bool,
    /// Run every hop with NSM_INSECURE=true (no mTLS, unverifiable tokens) instead of giving each its own SVID.
    #[arg(long)]
    insecure: bool,
    /// The endpoint's network functions in packet order: mesh-proxy, with a firewall (denies TCP 8081) before or after it and a WireGuard vpn (to a peer namespace the demo creates) last, e.g. firewall,mesh-proxy,vpn.
    #[arg(long, value_delimiter = ',', default_value = "mesh-proxy")]
    chain: Vec<String>,
    /// Placement sidecar with no proxy in the pod: the forwarder starts the proxy (--proxy's kind) inside the client's namespace before nsc-init returns (the endpoint's sidecarProxy, forwarder-plugin serve --proxies).
    #[arg(long, conflicts_with = "chain")]
    injected: bool,
}

/// The functions the demo can chain.
const FUNCTIONS: [&str; 3] = ["firewall", "mesh-proxy", "vpn"];
/// What the demo's firewall denies.
const DENIED_PORT: u16 = examples::lab::SERVER_PORT_2;

/// `--chain` checked: the proxy is what the demo shows, a tunnel is where
/// packets leave.
fn check_chain(chain: &[String]) -> Result<(), String> {
    for (i, f) in chain.iter().enumerate() {
        if !FUNCTIONS.contains(&f.as_str()) {
            return Err(format!(
                "--chain: {f:?} is not one of {}",
                FUNCTIONS.join(", ")
            ));
        }
        if chain[..i].contains(f) {
            return Err(format!("--chain: {f} is listed twice"));
        }
    }
    if !chain.iter().any(|f| f == "mesh-proxy") {
        return Err("--chain: the demo shows the proxy: include mesh-proxy".into());
    }
    if chain
        .iter()
        .position(|f| f == "vpn")
        .is_some_and(|i| i + 1 != chain.len())
    {
        return Err("--chain: vpn goes last (a tunnel is where packets leave)".into());
    }
    Ok(())
}

/// The endpoint's NSM_CONFIG for `chain` (version 2).
fn chain_config(chain: &[String], keys: Option<&VpnKeys>) -> String {
    let mut functions = String::new();
    for f in chain {
        functions.push_str(&match f.as_str() {
            "firewall" => format!(
                "  firewall:\n    type: firewall\n    defaultAction: allow\n    rules:\n      - action: deny\n        protocol: tcp\n        destinationPorts: [\"{DENIED_PORT}\"]\n"
            ),
            "vpn" => keys.map(|k| k.function_yaml("vpn")).unwrap_or_default(),
            _ => "  mesh-proxy:\n    type: mesh-proxy\n".to_owned(),
        });
    }
    format!(
        "version: 2\nfunctions:\n{functions}chains:\n  default: [{}]\n",
        chain.join(", ")
    )
}

/// What the chain adds to the demo.
struct Chain<'a> {
    names: &'a [String],
    peer: Option<&'a VpnPeer>,
}

impl Chain<'_> {
    fn has(&self, f: &str) -> bool {
        self.names.iter().any(|n| n == f)
    }

    fn firewall_first(&self) -> bool {
        let at = |f: &str| self.names.iter().position(|n| n == f);
        at("firewall") < at("mesh-proxy")
    }
}

/// Waits for a line on stdin (or Ctrl-C).
fn hold(client: &Namespace) -> Result<(), DemoError> {
    println!(
        "\nholding — try `ip netns exec {} curl -s http://{}/`; press Enter to go on",
        client.name(),
        server_addr()
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = tx.send(());
    });
    loop {
        cancel::check()?;
        if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum DemoError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error(transparent)]
    Nsc(#[from] NscError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Traffic(#[from] TrafficError),
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error(transparent)]
    Namespace(#[from] examples::namespace::NamespaceError),
    #[error("{0}")]
    Check(String),
    #[error(transparent)]
    Cancelled(#[from] cancel::Cancelled),
    #[error(transparent)]
    VpnPeer(#[from] VpnPeerError),
    #[error("{0}")]
    Io(String),
}

fn check(ok: bool, why: impl FnOnce() -> String) -> Result<(), DemoError> {
    if ok {
        Ok(())
    } else {
        Err(DemoError::Check(why()))
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}

fn show_links(title: &str, ns: &Namespace) -> Result<(), DemoError> {
    println!(
        "{title} {} — ip -br link:\n{}",
        ns.name(),
        indent(&inspect::brief_links(ns)?)
    );
    Ok(())
}

fn print_diff(what: &str, diff: &[String]) {
    if diff.is_empty() {
        println!("{what}: nothing added");
    } else {
        println!("{what}:\n{}", indent(&diff.join("\n")));
    }
}

/// The proxy's log line for a connection from `client` (it may lag a little).
fn proxy_line(lab: &Lab, client: SocketAddr) -> Result<SocketAddr, DemoError> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(dst) = lab.proxy_saw(client) {
            return Ok(dst);
        }
        cancel::check()?;
        if Instant::now() > deadline {
            return Err(DemoError::Check(format!(
                "the proxy logged no connection from {client}: the request did not go through it"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The app of the client pod, on this port: what the node's probes reach.
const APP_PORT: u16 = 8081;

/// The pod's own network at work: its DNS answered by the cluster DNS, and
/// a probe from the node answered by its app. What capture by intent must
/// never take away.
fn pod_network_works(lab: &Lab, client: &Namespace, pod: &PodNetwork) -> Result<(), DemoError> {
    let name = "kubernetes.default.svc.cluster.local";
    let got = dns::resolve(
        client,
        SocketAddr::new(IpAddr::V4(CLUSTER_DNS), 53),
        name,
        Duration::from_secs(5),
    )?;
    println!("DNS: {name} -> {got} (asked {CLUSTER_DNS}:53 over UDP from the client)");
    check(got == CLUSTER_DNS_ANSWER, || {
        format!("the cluster DNS answers {CLUSTER_DNS_ANSWER}, the client got {got}")
    })?;
    let to = SocketAddr::new(IpAddr::V4(pod.ip), APP_PORT);
    let probe = http_get(&lab.node_ns, to, Duration::from_secs(5))?;
    println!(
        "probe: the node ({}) -> the client's app {to}: answered \"{}\"",
        lab.node_ns.name(),
        examples::hello_server::greeting(probe.server_saw)
    );
    check(probe.server_saw.ip() == IpAddr::V4(NODE_IP), || {
        format!("the app saw {}, not the node {NODE_IP}", probe.server_saw)
    })
}

/// mTLS: nsc-init without an SVID (plaintext) gets no answer from the
/// forwarder, and nothing changes in its namespace.
fn stranger_is_refused(lab: &Lab) -> Result<(), DemoError> {
    let stranger = lab.client()?;
    let before = inspect::snapshot(&stranger)?;
    let mut opts = examples::nsc::NscOptions::new(&lab.forwarder_url(), "stranger");
    opts.request_timeout = "2s".into();
    let run = examples::nsc::run(&stranger, &opts)?;
    let why = run.stderr.lines().last().unwrap_or("").to_owned();
    println!(
        "mTLS: nsc-init without an SVID (NSM_INSECURE=true) in {}: exit {} — {why}",
        stranger.name(),
        run.status.code().unwrap_or(-1)
    );
    check(
        run.status.code() == Some(examples::nsc::exit::UNREACHABLE),
        || format!("a plaintext caller must get no answer: {run:?}"),
    )?;
    check(inspect::snapshot(&stranger)? == before, || {
        "the refused caller's namespace changed".into()
    })
}

/// The chain's other functions at work: the firewall's denied port, the
/// tunnel to the server behind the WireGuard peer.
fn chain_works(lab: &Lab, client: &Namespace, chain: &Chain<'_>) -> Result<(), DemoError> {
    if chain.has("firewall") {
        let to = SocketAddr::new(server_addr().ip(), DENIED_PORT);
        let res = http_get(client, to, Duration::from_secs(3));
        let proxy_saw = lab.proxy_lines().iter().any(|(_, d)| *d == to);
        if chain.firewall_first() {
            println!(
                "firewall (before the proxy): client -> {to}: {}; the proxy saw it: {proxy_saw}",
                res.as_ref()
                    .map_or_else(|e| format!("refused ({e})"), |_| "answered".into())
            );
            check(res.is_err() && !proxy_saw, || {
                format!("the firewall before the proxy must refuse {to} before the proxy sees it")
            })?;
        } else {
            // The proxy accepts first; its own connection upstream is dropped.
            std::thread::sleep(Duration::from_millis(200));
            let proxy_saw = lab.proxy_lines().iter().any(|(_, d)| *d == to);
            println!(
                "firewall (after the proxy): client -> {to}: {}; the proxy took it: {proxy_saw}, its connection upstream was dropped",
                res.as_ref()
                    .map_or_else(|_| "no answer".to_owned(), |_| "answered".into())
            );
            check(res.is_err() && proxy_saw, || {
                format!("the firewall after the proxy must drop the proxy's connection to {to}")
            })?;
        }
    }
    if let Some(peer) = chain.peer {
        let behind = vpn_peer::behind();
        let ex = http_get(client, behind, Duration::from_secs(5))?;
        let (wireguard, clear) = peer.counters()?;
        println!(
            "vpn: client -> {behind} (behind the WireGuard peer in {}): answered \"{}\"; \
             on the peer's underlay: {wireguard} WireGuard packets, {clear} in clear",
            peer.ns.name(),
            examples::hello_server::greeting(ex.server_saw)
        );
        check(
            ex.server_saw.ip().to_string() == vpn_peer::NSE_TUNNEL_IP
                && wireguard > 0
                && clear == 0,
            || {
                "the server behind the peer must see the endpoint's tunnel address, over WireGuard only".into()
            },
        )?;
    }
    Ok(())
}

fn demo(
    args: &Args,
    lab: &mut Lab,
    client: &Namespace,
    chain: &Chain<'_>,
) -> Result<(), DemoError> {
    let pod = lab.attach_pod_network(client)?;
    let mut cmd = client.command(process::bin("hello-server"));
    cmd.args(["--listen", &format!("0.0.0.0:{APP_PORT}")]);
    let mut app = Process::spawn("client app", &mut cmd, &lab.dir.join("app.log"))?;
    examples::proxy::wait_listening(&mut app, APP_PORT, Duration::from_secs(10))?;
    println!(
        "client {}: eth0 {}/24 on the node's bridge, default route via the node {NODE_IP}, \
         an app on :{APP_PORT}",
        client.name(),
        pod.ip
    );
    pod_network_works(lab, client, &pod)?;
    show_links("client", client)?;
    show_links("endpoint", &lab.nse_ns)?;
    let client_before = inspect::snapshot(client)?;
    let nse_before = inspect::snapshot(&lab.nse_ns)?;

    step("2. nsc-init --watch in the client asks for kernel://mesh-proxy/nsm-1");
    let opts = lab.nsc_options("demo-client")?;
    let (mut nsc, up) = examples::nsc::watch(
        client,
        &opts,
        &lab.dir.join("nsc-init.log"),
        Duration::from_secs(30),
    )?;
    println!(
        "nsc-init: {} up: {} {} -> {}",
        up.url,
        up.iface,
        up.src.join(","),
        up.dst.join(",")
    );
    let client_ip = up
        .src_ip()
        .ok_or_else(|| DemoError::Check(format!("nsc-init reported no client address: {up:?}")))?;
    println!(
        "client {} — ip -br addr:\n{}",
        client.name(),
        indent(&inspect::brief_addrs(client)?)
    );
    println!(
        "client routes via {}:\n{}",
        up.iface,
        indent(&inspect::routes_via(client, &up.iface)?.join("\n"))
    );
    let client_up = inspect::snapshot(client)?;
    let nse_up = inspect::snapshot(&lab.nse_ns)?;
    check(client_up.links.contains(&up.iface), || {
        format!(
            "no {} link in the client namespace after nsc-init said it is up",
            up.iface
        )
    })?;
    for (whose, ns, before, after) in [
        ("client", client, &client_before, &client_up),
        ("endpoint", &lab.nse_ns, &nse_before, &nse_up),
    ] {
        // Firewall rules read better whole than as a line diff.
        let diff: Vec<String> = before
            .diff(after)
            .into_iter()
            .filter(|l| !l.starts_with("+ nft") && !l.starts_with("- nft"))
            .collect();
        print_diff(&format!("what the connection added in the {whose}"), &diff);
        if after.nft != before.nft {
            println!(
                "{whose} {} — nft list ruleset:\n{}",
                ns.name(),
                indent(&inspect::nft_ruleset(ns)?)
            );
        }
    }

    if lab.config.secure {
        stranger_is_refused(lab)?;
    }

    step("3. requests from the client to the server");
    for i in 1..=args.requests {
        let ex = http_get(client, server_addr(), Duration::from_secs(5))?;
        // The pod's own route picked eth0's address; the forwarder's rules
        // send the connection out of nsm-1 with that interface's address.
        let seen_as = SocketAddr::new(client_ip, ex.local.port());
        let dst = proxy_line(lab, seen_as)?;
        println!(
            "request {i}: client {} -> {}; proxy ({}) saw \"{} -> {}\"; server answered \"{}\"",
            ex.local,
            server_addr(),
            lab.config.proxy.name(),
            seen_as,
            dst,
            examples::hello_server::greeting(ex.server_saw)
        );
        check(dst == server_addr(), || {
            format!(
                "the proxy connected to {dst}, not to the original destination {}",
                server_addr()
            )
        })?;
        check(ex.server_saw.ip() == IpAddr::V4(NSE_UPLINK), || {
            format!(
                "the server saw {}, not the endpoint's address {NSE_UPLINK}: the traffic bypassed the proxy",
                ex.server_saw
            )
        })?;
    }
    println!(
        "so: every request the client started went through the proxy in {} (from {client_ip}, \
         its {} address), and the server saw {NSE_UPLINK}, never the client",
        lab.nse_ns.name(),
        up.iface
    );
    if chain.names.len() > 1 {
        step(&format!(
            "3b. the rest of the chain ({})",
            chain.names.join(" → ")
        ));
        chain_works(lab, client, chain)?;
    }
    println!("meanwhile the client's own network works as before:");
    pod_network_works(lab, client, &pod)?;

    if args.hold {
        hold(client)?;
    }

    step("4. SIGTERM to nsc-init: it Closes the connection");
    let status = nsc.terminate(Duration::from_secs(15))?;
    check(status.success(), || {
        format!(
            "nsc-init exited with {status} after SIGTERM: {}",
            nsc.tail()
        )
    })?;
    println!("nsc-init exited: {status}");
    let client_after = inspect::snapshot(client)?;
    let nse_after = inspect::snapshot(&lab.nse_ns)?;
    show_links("client", client)?;
    show_links("endpoint", &lab.nse_ns)?;
    // (Only so the listing does not show a working veth as DOWN: see wait_oper_up.)
    inspect::wait_oper_up(&lab.server_ns, SERVER_TO_NSE, Duration::from_secs(2))?;
    show_links("server", &lab.server_ns)?;
    let left = |before: &NsState, after: &NsState| before.diff(after);
    let (client_left, nse_left) = (
        left(&client_before, &client_after),
        inspect::diff_but_idle_nse_table(&lab.nse_ns, &nse_before, &nse_after)
            .map_err(DemoError::Check)?,
    );
    check(!client_after.links.contains(&up.iface), || {
        format!(
            "the {} link is still in the client namespace after Close",
            up.iface
        )
    })?;
    check(client_left.is_empty(), || {
        format!(
            "Close left this in the client namespace: {}",
            client_left.join("; ")
        )
    })?;
    check(nse_left.is_empty(), || {
        format!(
            "Close left this in the endpoint namespace: {}",
            nse_left.join("; ")
        )
    })?;
    check(!client_after.has_nft_tables(), || {
        "an nftables table is still in the client namespace after Close".into()
    })?;
    println!(
        "nothing left: no {} link, no endpoint-side link, no route, no address, no rule; \
         the NSE keeps its own table, with no interface in its set, for the next connection",
        up.iface
    );
    pod_network_works(lab, client, &pod)?;
    drop(app);
    Ok(())
}

fn run(args: &Args) -> Result<(), DemoError> {
    step(&format!(
        "1. topology (proxy: {}, {})",
        args.proxy.name(),
        if args.injected {
            "injected by the forwarder into the client".to_owned()
        } else {
            format!("chain: {}", args.chain.join(" → "))
        }
    ));
    let scratch = std::env::temp_dir().join(format!("mp-demo-chain-{}", std::process::id()));
    let res = with_scratch(args, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    res
}

fn with_scratch(args: &Args, scratch: &std::path::Path) -> Result<(), DemoError> {
    let io = |e: std::io::Error| DemoError::Io(format!("{}: {e}", scratch.display()));
    let mut nse_env = Vec::new();
    let mut keys = None;
    if args.chain != ["mesh-proxy"] {
        std::fs::create_dir_all(scratch).map_err(io)?;
        if args.chain.iter().any(|f| f == "vpn") {
            keys = Some(VpnKeys::generate(scratch).map_err(io)?);
        }
        let config = scratch.join("nse-chain.yaml");
        let text = chain_config(&args.chain, keys.as_ref());
        std::fs::write(&config, &text).map_err(io)?;
        println!("NSM_CONFIG of the endpoint:\n{}", indent(&text));
        nse_env.push(("NSM_CONFIG".to_owned(), config.display().to_string()));
    }
    let config = if args.injected {
        LabConfig {
            say: |s| println!("{s}"),
            secure: !args.insecure,
            ..injected::lab_config(args.proxy, scratch)?
        }
    } else {
        LabConfig {
            proxy: args.proxy,
            say: |s| println!("{s}"),
            secure: !args.insecure,
            nse_env,
            ..Default::default()
        }
    };
    let mut lab = Lab::start(config)?;
    let peer = match &keys {
        Some(k) => {
            let p = VpnPeer::start(&lab.nse_ns, k, scratch)?;
            println!(
                "WireGuard peer {}: underlay 198.18.230.2/30 ⇄ the endpoint's 198.18.230.1/30, \
                 a server behind it on {}",
                p.ns.name(),
                vpn_peer::BEHIND
            );
            Some(p)
        }
        None => None,
    };
    let client = lab.client()?;
    let mut names = vec![
        client.name().to_owned(),
        lab.nse_ns.name().to_owned(),
        lab.server_ns.name().to_owned(),
        lab.node_ns.name().to_owned(),
    ];
    names.extend(peer.as_ref().map(|p| p.ns.name().to_owned()));
    let chain = Chain {
        names: &args.chain,
        peer: peer.as_ref(),
    };
    let res = if args.injected {
        injected::demo(&mut lab, &client, scratch)
    } else {
        demo(args, &mut lab, &client, &chain)
    };
    if res.is_err() {
        eprintln!("\nlogs:{}", lab.logs());
        if let Some(p) = &peer {
            eprintln!("{}", p.logs());
        }
    }
    step("5. teardown");
    drop(client);
    drop(peer);
    drop(lab);
    let left: Vec<&String> = names
        .iter()
        .filter(|n| std::path::Path::new("/run/netns").join(n).exists())
        .collect();
    res?;
    check(left.is_empty(), || {
        format!("namespaces still there after teardown: {left:?}")
    })?;
    println!("processes stopped, namespaces {} deleted", names.join(", "));
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = check_chain(&args.chain) {
        eprintln!("local-demo: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = cancel::install() {
        eprintln!("demo: FAILED: {e}");
        return ExitCode::FAILURE;
    }
    match run(&args) {
        Ok(()) => {
            println!("demo: OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let code = if cancel::is_cancelled() { 130 } else { 1 };
            eprintln!("demo: FAILED: {e}");
            ExitCode::from(code)
        }
    }
}
