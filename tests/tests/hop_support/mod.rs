//! Drives `forwarder-plugin serve` as a separate process between a test
//! client and a FAKE endpoint, both over real unix sockets with grpcfd:
//!
//! ```text
//! TestClient ──Request(KERNEL nsm-1, client netns fd)──▶ forwarder-plugin serve
//!            ──Request(KERNEL {})──▶ FakeEndpoint (answers with fixed addresses and its netns fd)
//! ```
//! plus snapshots of namespaces (`ip -j`, `nft list ruleset`) to prove
//! nothing was left behind, and TCP across the plumbed veth.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use forwarder_plugin::netns::Netns;
use nsm_api::connection::{Connection, Mechanism, Path as NsmPath, PathSegment};
use nsm_api::connectioncontext::{ConnectionContext, IpContext, Route};
use nsm_api::grpcfd;
use nsm_api::inode::InodeUrl;
use nsm_api::mechanism::{self as mech, MechanismExt, keys};
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::networkservice::network_service_client::NetworkServiceClient;
use nsm_api::networkservice::network_service_server::{NetworkService, NetworkServiceServer};
use nsm_api::path::to_timestamp;
use nsm_api::{TOKEN_EXPIRES_METADATA, TOKEN_METADATA};
use nsm_tests::netns::TestNetns;
use nsm_tests::process::{ChildGuard, bin};
use serde_json::Value;
use tonic::{Request, Response, Status};

/// How long anything may take before it counts as hung.
pub const WAIT: Duration = Duration::from_secs(10);

pub const CLIENT_IP: &str = "198.18.0.1";
pub const ENDPOINT_IP: &str = "198.18.0.2";
/// Behind the endpoint, reached via ENDPOINT_IP (src_routes' nextHop).
pub const FAR_NET: &str = "198.18.10.0/24";
/// Behind the client, reached via CLIENT_IP (dst_routes' nextHop).
pub const NEAR_NET: &str = "198.18.20.0/24";

/// The addresses the fake endpoint gives its `n`-th connection (the
/// constants above are connection 0's).
#[derive(Debug, Clone)]
pub struct Addrs {
    pub client_ip: String,
    pub endpoint_ip: String,
    pub far_net: String,
    pub near_net: String,
}

pub fn addrs_for(n: usize) -> Addrs {
    Addrs {
        client_ip: format!("198.18.{n}.1"),
        endpoint_ip: format!("198.18.{n}.2"),
        far_net: format!("198.18.{}.0/24", 10 + n),
        near_net: format!("198.18.{}.0/24", 20 + n),
    }
}

/// A temp directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(nsm_tests::unique("fwd"));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------- fake endpoint

/// What the fake endpoint answers.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// `extra_context["mesh-proxy.v1/client-redirect"]`.
    pub redirect: Option<String>,
    /// `extra_context["mesh-proxy.v1/client-capture"]`.
    pub capture: Option<String>,
    /// `ip_context.policies`.
    pub policies: Vec<nsm_api::connectioncontext::PolicyRoute>,
    /// Send the fd of this namespace file instead of the endpoint's own.
    pub netns_file: Option<PathBuf>,
    /// Answer without src/dst addresses.
    pub no_addresses: bool,
    /// Wait this long before answering a Request.
    pub delay: Duration,
    /// `context.MTU`.
    pub mtu: u32,
}

#[derive(Debug, Default)]
pub struct Seen {
    pub requests: Vec<(NetworkServiceRequest, Option<String>)>,
    pub closes: Vec<Connection>,
}

#[derive(Clone)]
struct FakeService {
    netns: Arc<File>,
    ifname: String,
    /// Connection id → its number, in order of first Request.
    numbers: Arc<Mutex<HashMap<String, usize>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    seen: Arc<Mutex<Seen>>,
}

#[tonic::async_trait]
impl NetworkService for FakeService {
    async fn request(
        &self,
        request: Request<NetworkServiceRequest>,
    ) -> Result<Response<Connection>, Status> {
        let token = request
            .metadata()
            .get(TOKEN_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let fds = request.extensions().get::<grpcfd::FdChannel>().cloned();
        let req = request.into_inner();
        self.seen
            .lock()
            .unwrap()
            .requests
            .push((req.clone(), token));
        let b = self.behaviour.lock().unwrap().clone();
        if !b.delay.is_zero() {
            tokio::time::sleep(b.delay).await;
        }
        let mut conn = req
            .connection
            .ok_or_else(|| Status::invalid_argument("no connection"))?;
        // The endpoint's own segment after the caller's, kept on refresh.
        let path = conn.path.get_or_insert_with(NsmPath::default);
        let i = path.index as usize;
        if path.path_segments.len() <= i + 1 {
            path.path_segments.push(PathSegment {
                name: "fake-nse".into(),
                id: format!("nse-{}", conn.id),
                ..Default::default()
            });
        }
        let seg = &mut path.path_segments[i + 1];
        seg.token = "nse-token".into();
        seg.expires = Some(to_timestamp(SystemTime::now() + Duration::from_secs(600)));
        let other = b
            .netns_file
            .as_ref()
            .map(File::open)
            .transpose()
            .map_err(|e| Status::internal(e.to_string()))?;
        let url = fds
            .ok_or_else(|| Status::failed_precondition("no fd channel"))?
            .send_fd(other.as_ref().map_or(self.netns.as_fd(), |f| f.as_fd()))
            .map_err(|e| Status::internal(e.to_string()))?;
        let n = {
            let mut numbers = self.numbers.lock().unwrap();
            let next = numbers.len();
            *numbers.entry(conn.id.clone()).or_insert(next)
        };
        let a = addrs_for(n);
        let name = conn
            .mechanism
            .as_ref()
            .and_then(|m| m.interface_name().map(str::to_owned))
            .unwrap_or_else(|| ifname_for(&self.ifname, n));
        let mut m = mech::kernel([]);
        m.set_param(keys::NAME, name);
        m.set_param(keys::INODE_URL, url.to_string());
        conn.mechanism = Some(m);
        let route = |prefix: &str, next_hop: &str| Route {
            prefix: prefix.into(),
            next_hop: next_hop.into(),
        };
        let mut ctx = conn.context.take().unwrap_or_default();
        ctx.ip_context = Some(if b.no_addresses {
            IpContext::default()
        } else {
            IpContext {
                src_ip_addrs: vec![format!("{}/32", a.client_ip)],
                dst_ip_addrs: vec![format!("{}/32", a.endpoint_ip)],
                src_routes: vec![
                    route(&format!("{}/32", a.endpoint_ip), ""),
                    route(&a.far_net, &a.endpoint_ip),
                ],
                dst_routes: vec![
                    route(&format!("{}/32", a.client_ip), ""),
                    route(&a.near_net, &a.client_ip),
                ],
                policies: b.policies.clone(),
                ..Default::default()
            }
        });
        ctx.mtu = b.mtu;
        // What the caller's forwarder announced is for us, not to echo back.
        ctx.extra_context
            .retain(|k, _| !k.starts_with("mesh-proxy."));
        if let Some(c) = &b.capture {
            ctx.extra_context
                .insert("mesh-proxy.v1/client-capture".into(), c.clone());
        }
        if let Some(r) = &b.redirect {
            ctx.extra_context
                .insert("mesh-proxy.v1/client-redirect".into(), r.clone());
        }
        conn.context = Some(ctx);
        Ok(Response::new(conn))
    }

    async fn close(&self, request: Request<Connection>) -> Result<Response<()>, Status> {
        self.seen.lock().unwrap().closes.push(request.into_inner());
        Ok(Response::new(()))
    }
}

/// The endpoint's interface name for its `n`-th connection.
pub fn ifname_for(base: &str, n: usize) -> String {
    if n == 0 {
        base.to_owned()
    } else {
        format!("{base}-{n}")
    }
}

/// A NetworkService endpoint on a unix socket, answering with fixed
/// addresses and sending the fd of `netns` (a /run/netns entry) as its
/// KERNEL mechanism's `inodeURL`.
pub struct FakeEndpoint {
    pub socket: PathBuf,
    pub ifname: String,
    behaviour: Arc<Mutex<Behaviour>>,
    seen: Arc<Mutex<Seen>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeEndpoint {
    pub async fn start(dir: &Path, netns: &TestNetns, behaviour: Behaviour) -> FakeEndpoint {
        let socket = dir.join("nse.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind fake endpoint");
        let ifname = nsm_tests::unique("nse");
        let svc = FakeService {
            netns: Arc::new(File::open(netns.path()).expect("open endpoint netns")),
            ifname: ifname.clone(),
            numbers: Arc::default(),
            behaviour: Arc::new(Mutex::new(behaviour)),
            seen: Arc::default(),
        };
        let (behaviour, seen) = (svc.behaviour.clone(), svc.seen.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(NetworkServiceServer::new(svc))
                .serve_with_incoming_shutdown(grpcfd::incoming(listener), async {
                    let _ = stopped.await;
                }),
        );
        FakeEndpoint {
            socket,
            ifname,
            behaviour,
            seen,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.behaviour.lock().unwrap());
    }

    pub fn requests(&self) -> Vec<(NetworkServiceRequest, Option<String>)> {
        self.seen.lock().unwrap().requests.clone()
    }

    pub fn closes(&self) -> Vec<Connection> {
        self.seen.lock().unwrap().closes.clone()
    }
}

impl Drop for FakeEndpoint {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

// ---------------------------------------------------------------- the hop

/// A running `forwarder-plugin serve`, killed on drop.
pub struct Hop {
    pub child: ChildGuard,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
}

impl Hop {
    /// Starts the hop in `dir` towards `next_hop` and waits for its socket.
    pub fn start(dir: &Path, next_hop: &str, args: &[&str], env: &[(&str, &str)]) -> Hop {
        let socket = dir.join("fwd.sock");
        let state_dir = dir.join("state");
        let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        let log = dir.join(format!("fwd-{n}.log"));
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(bin("forwarder-plugin"));
        cmd.arg("serve")
            .args(["--listen-on", &format!("unix://{}", socket.display())])
            .args(["--next-hop", next_hop])
            .args(["--state-dir", state_dir.to_str().unwrap()])
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("NSM_INSECURE", "true")
            .env("NSM_LOG_LEVEL", "INFO")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"));
        let mut child = ChildGuard::spawn(&mut cmd);
        let deadline = Instant::now() + WAIT;
        // Until it accepts: the file alone may come before the listener.
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Ok(Some(st)) = child.0.try_wait() {
                panic!(
                    "forwarder-plugin exited with {st}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "forwarder-plugin did not listen within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Hop {
            child,
            socket,
            state_dir,
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The state directory's connection files (`connections/*.json`, one
    /// per connection, each checked to be version 2 and named after its id)
    /// as `{"connections": {id: record}}`.
    pub fn state(&self) -> Value {
        let mut connections = serde_json::Map::new();
        let dir = self.state_dir.join("connections");
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // a write in progress
            }
            let text = std::fs::read_to_string(entry.path()).expect("read a connection file");
            let v: Value = serde_json::from_str(&text).expect("a connection file is JSON");
            assert_eq!(v["version"], 2, "{name}: {v}");
            let id = v["id"].as_str().expect("a connection file names its id");
            assert_eq!(
                name,
                format!("{}.json", forwarder_plugin::hop::file_stem(id)),
                "{v}"
            );
            connections.insert(id.to_owned(), v["record"].clone());
        }
        serde_json::json!({ "connections": connections })
    }

    pub fn kill9(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }
}

// ---------------------------------------------------------------- the client

/// How the client names its namespace.
pub enum ClientNetns<'a> {
    /// Sends the fd of this /run/netns entry, with its inode URL.
    Fd(&'a TestNetns),
    /// Sends the fd of an arbitrary file (not a namespace).
    FileFd(&'a Path),
    /// Only the inode URL, no fd.
    InodeOnly(InodeUrl),
}

pub struct TestClient {
    pub socket: PathBuf,
    pub id: String,
}

pub fn own_segment(id: &str, expires_in: Duration) -> PathSegment {
    PathSegment {
        name: "test-client".into(),
        id: id.into(),
        token: "client-token".into(),
        expires: Some(to_timestamp(SystemTime::now() + expires_in)),
        ..Default::default()
    }
}

impl TestClient {
    pub fn new(socket: &Path) -> TestClient {
        TestClient {
            socket: socket.to_owned(),
            id: nsm_tests::unique("conn-"),
        }
    }

    /// A first Request's connection: path = [us].
    pub fn first(&self) -> Connection {
        Connection {
            id: self.id.clone(),
            network_service: "mesh-proxy".into(),
            path: Some(NsmPath {
                index: 0,
                path_segments: vec![own_segment(&self.id, Duration::from_secs(600))],
            }),
            ..Default::default()
        }
    }

    /// Sends `conn` (our segment's expiry renewed to `expires_in`) with a
    /// KERNEL preference named `ifname`, over a fresh connection.
    pub async fn request(
        &self,
        mut conn: Connection,
        ifname: &str,
        netns: ClientNetns<'_>,
        expires_in: Duration,
        timeout: Duration,
    ) -> Result<Connection, Status> {
        let (channel, fds) = grpcfd::dial(&self.socket).await.expect("dial the hop");
        let inode = match netns {
            ClientNetns::Fd(ns) => {
                let f = File::open(ns.path()).expect("open client netns");
                fds.send_fd(f.as_fd()).expect("send netns fd")
            }
            ClientNetns::FileFd(p) => {
                let f = File::open(p).expect("open file");
                fds.send_fd(f.as_fd()).expect("send file fd")
            }
            ClientNetns::InodeOnly(u) => u,
        };
        let mut pref = mech::kernel([]);
        pref.set_param(keys::NAME, ifname);
        pref.set_param(keys::INODE_URL, inode.to_string());
        if let Some(m) = conn.mechanism.as_mut() {
            m.set_param(keys::INODE_URL, inode.to_string());
        }
        let seg = own_segment(&self.id, expires_in);
        let path = conn.path.get_or_insert_with(NsmPath::default);
        path.index = 0;
        path.path_segments[0].token = seg.token.clone();
        path.path_segments[0].expires = seg.expires;
        let msg = NetworkServiceRequest {
            connection: Some(conn),
            mechanism_preferences: vec![pref],
        };
        let mut client = NetworkServiceClient::new(channel);
        let call = client.request(with_token(msg, expires_in, timeout));
        match tokio::time::timeout(timeout + Duration::from_secs(5), call).await {
            Ok(r) => r.map(Response::into_inner),
            Err(_) => panic!("the hop did not answer within {timeout:?} + 5s"),
        }
    }

    pub async fn close(&self, conn: Connection) -> Result<(), Status> {
        let (channel, _fds) = grpcfd::dial(&self.socket).await.expect("dial the hop");
        let mut client = NetworkServiceClient::new(channel);
        client
            .close(with_token(conn, Duration::from_secs(600), WAIT))
            .await
            .map(|_| ())
    }
}

fn with_token<T>(msg: T, expires_in: Duration, timeout: Duration) -> Request<T> {
    let mut req = Request::new(msg);
    req.set_timeout(timeout);
    let expires = chrono::DateTime::<chrono::Utc>::from(SystemTime::now() + expires_in)
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    req.metadata_mut()
        .insert(TOKEN_METADATA, "client-token".parse().unwrap());
    req.metadata_mut()
        .insert(TOKEN_EXPIRES_METADATA, expires.parse().unwrap());
    req
}

pub fn kernel_name(m: Option<&Mechanism>) -> Option<String> {
    m.and_then(|m| m.interface_name().map(str::to_owned))
}

// ---------------------------------------------------------------- inspection

/// `ip -n <ns> -j <args>` parsed; an empty reply is an empty array.
pub fn ip(ns: &TestNetns, args: &[&str]) -> Value {
    let out = Command::new("ip")
        .args(["-n", ns.name(), "-j"])
        .args(args)
        .output()
        .expect("spawn ip");
    assert!(
        out.status.success(),
        "ip {args:?} in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Value::Array(vec![]);
    }
    serde_json::from_slice(&out.stdout).expect("ip -j output is JSON")
}

/// Everything a test could leave behind in a namespace: links, addresses,
/// routes of every table and family, ip rules, and the nftables ruleset;
/// one object per line. What the kernel changes on its own over time (IPv6
/// duplicate address detection flags, lifetimes) is left out.
pub fn snapshot(ns: &TestNetns) -> String {
    let mut s = String::new();
    for args in [
        &["link", "show"][..],
        &["addr", "show"],
        &["-4", "route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
        &["-4", "rule", "show"],
        &["-6", "rule", "show"],
    ] {
        // Sorted: the kernel's dump order is not part of the state.
        let mut lines: Vec<String> = ip(ns, args)
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|mut item| {
                strip_volatile(&mut item);
                format!("{args:?} {item}\n")
            })
            .collect();
        lines.sort();
        s.extend(lines);
    }
    s.push_str(&ns.exec_ok(&["nft", "list", "ruleset"]));
    s
}

/// Drops what the kernel changes by itself after a link comes up: carrier
/// and operational state, IPv6 link-local addresses and their DAD flags,
/// address lifetimes.
fn strip_volatile(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for k in [
                "operstate",
                "tentative",
                "optimistic",
                "dadfailed",
                "preferred_life_time",
                "valid_life_time",
            ] {
                m.remove(k);
            }
            if let Some(Value::Array(flags)) = m.get_mut("flags") {
                flags.retain(|f| f != "NO-CARRIER" && f != "LOWER_UP");
            }
            if let Some(Value::Array(addrs)) = m.get_mut("addr_info") {
                addrs.retain(|a| !(a["family"] == "inet6" && a["scope"] == "link"));
            }
            m.values_mut().for_each(strip_volatile);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_volatile),
        _ => {}
    }
}

/// Asserts two snapshots are equal, printing only the lines that differ.
pub fn assert_same(before: &str, after: &str, what: &str) {
    if before == after {
        return;
    }
    let gone: Vec<&str> = before
        .lines()
        .filter(|l| !after.lines().any(|a| a == *l))
        .collect();
    let new: Vec<&str> = after
        .lines()
        .filter(|l| !before.lines().any(|b| b == *l))
        .collect();
    panic!("{what}\n  gone: {gone:#?}\n  new: {new:#?}\n  before:\n{before}\n  after:\n{after}");
}

/// The link `name` in `ns`, if any.
pub fn link(ns: &TestNetns, name: &str) -> Option<Value> {
    ip(ns, &["link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["ifname"] == name)
        .cloned()
}

/// Global addresses of `dev` as "ip/prefix", sorted.
pub fn addrs(ns: &TestNetns, dev: &str) -> Vec<String> {
    let v = ip(ns, &["addr", "show", "dev", dev]);
    let mut out: Vec<String> = v[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["scope"] != "link")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    out.sort();
    out
}

/// IPv4 routes out of `dev` that we made (not the kernel's), "dst [via gw]".
pub fn routes(ns: &TestNetns, dev: &str) -> Vec<String> {
    let mut out: Vec<String> = ip(ns, &["-4", "route", "show", "dev", dev])
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["protocol"] != "kernel")
        .map(|r| {
            let mut dst = r["dst"].as_str().unwrap().to_owned();
            if !dst.contains('/') {
                dst += "/32";
            }
            match r.get("gateway") {
                Some(gw) => format!("{dst} via {}", gw.as_str().unwrap()),
                None => dst,
            }
        })
        .collect();
    out.sort();
    out
}

/// The nftables tables in `ns` as "family name".
pub fn nft_tables(ns: &TestNetns) -> Vec<String> {
    let v: Value = serde_json::from_str(&ns.exec_ok(&["nft", "-j", "list", "tables"])).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("table"))
        .map(|t| {
            format!(
                "{} {}",
                t["family"].as_str().unwrap(),
                t["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// Polls `f` until it is true or `WAIT` passes.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------- traffic

/// A TCP listener whose socket lives in `ns`.
pub fn listen_in(ns: &TestNetns, addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().unwrap();
    Netns::open(ns.name())
        .unwrap()
        .run(move || TcpListener::bind(addr))
        .unwrap()
        .expect("bind in namespace")
}

/// A TCP connection made from inside `ns`.
pub fn connect_in(ns: &TestNetns, addr: &str) -> std::io::Result<TcpStream> {
    let addr: SocketAddr = addr.parse().unwrap();
    Netns::open(ns.name())
        .unwrap()
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
        .unwrap()
}

/// Sends `msg` from `ns` to `addr`, where `listener` accepts and echoes it;
/// returns the echo and the address the listener saw as the peer.
pub fn echo(
    listener: &TcpListener,
    ns: &TestNetns,
    addr: &str,
    msg: &[u8],
) -> (Vec<u8>, SocketAddr) {
    let l = listener.try_clone().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        s.write_all(&buf[..n]).unwrap();
        peer
    });
    let mut c = connect_in(ns, addr).expect("connect across the hop");
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    c.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    c.read_exact(&mut got).unwrap();
    (got, server.join().unwrap())
}

/// `ip -j link` ifindex of `name` in `ns`.
pub fn ifindex(ns: &TestNetns, name: &str) -> u64 {
    link(ns, name).unwrap_or_else(|| panic!("no link {name}"))["ifindex"]
        .as_u64()
        .unwrap()
}

pub fn segments(conn: &Connection) -> HashMap<String, PathSegment> {
    conn.path
        .as_ref()
        .unwrap()
        .path_segments
        .iter()
        .map(|s| (s.name.clone(), s.clone()))
        .collect()
}

pub fn ctx_of(conn: &Connection) -> &ConnectionContext {
    conn.context.as_ref().expect("context")
}
