//! The real `nsc-init` binary against a fake network service manager: a
//! tonic NetworkService on a unix socket (grpcfd) that checks each request's
//! shape, receives the client's netns fd, and — like a forwarder — builds an
//! interface with the promised address inside that very netns (one end of a veth pair).
//! nsc-init runs inside a TestNetns whenever the fake builds something, so
//! the root namespace is never touched.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use forwarder_plugin::netns::Netns;
use nsm_api::connection::{Connection, Mechanism, PathSegment};
use nsm_api::connectioncontext::{ConnectionContext, IpContext};
use nsm_api::grpcfd::{self, FdChannel};
use nsm_api::inode::InodeUrl;
use nsm_api::mechanism::{MechanismExt, keys};
use nsm_api::monitor::MonitorHub;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::networkservice::network_service_server::{NetworkService, NetworkServiceServer};
use nsm_api::path::{ConnectionExt, from_timestamp, to_timestamp};
use nsm_api::tls::Identity;
use nsm_api::token::TokenIssuer;
use nsm_api::transport::{Listen, Peer, serve};
use nsm_api::{TOKEN_EXPIRES_METADATA, TOKEN_METADATA};
use nsm_tests::netns::TestNetns;
use nsm_tests::process::{ChildGuard, bin};
use nsm_tests::{require_root, unique};
use tonic::{Request, Response, Status};

// ---------------------------------------------------------------- the fake

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// Build the interface, answer with its addresses.
    Up,
    /// Refuse: the service is unknown.
    NotFound,
    /// Answer with addresses but build nothing.
    NoInterface,
}

/// A request as the fake saw it: connection, first preference, problems.
type Req = (Connection, Mechanism, Vec<String>);

#[derive(Clone, Debug)]
enum Seen {
    Request {
        conn: Connection,
        pref: Mechanism,
        /// What did not match the NSM client contract (empty = all good).
        problems: Vec<String>,
    },
    Close(Connection),
}

struct Manager {
    answer: Answer,
    /// NSM_NAME the client was given.
    name: String,
    /// The netns the passed fd must be.
    netns: InodeUrl,
    /// `expires` the fake puts in its own segment.
    lifetime: Duration,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Refuse the next refresh (a request whose path already holds our segment).
    refuse_refresh: Arc<AtomicBool>,
    /// Under TLS: signs our segment as nsmgr would (`None`: plaintext, a
    /// placeholder token).
    signer: Option<Arc<Identity>>,
    /// Under TLS, put a token no one signed in our segment.
    forge: bool,
}

/// src 198.18.0.(2i+1), dst 198.18.0.(2i) for the i-th service.
fn addresses(i: u32) -> (String, String) {
    (
        format!("198.18.0.{}/32", 2 * i + 1),
        format!("198.18.0.{}/32", 2 * i),
    )
}

impl Manager {
    /// Everything the client must send, as NSM's client chain sends it;
    /// returns what is wrong and the netns that arrived as an fd.
    async fn check(
        &self,
        md: &tonic::metadata::MetadataMap,
        fds: Option<FdChannel>,
        msg: &NetworkServiceRequest,
    ) -> (Vec<String>, Option<Netns>) {
        let mut problems = Vec::new();
        let mut passed = None;
        let mut bad = |p: String| problems.push(p);
        let conn = msg.connection.clone().unwrap_or_default();
        let token = md.get(TOKEN_METADATA).and_then(|v| v.to_str().ok());
        match token {
            Some(t) => match jsonwebtoken::decode_header(t) {
                Ok(h) if h.alg == jsonwebtoken::Algorithm::ES256 => {}
                other => bad(format!("token is not an ES256 JWT: {other:?}")),
            },
            None => bad("no nsm-client-token metadata".into()),
        }
        let expires = md.get(TOKEN_EXPIRES_METADATA).and_then(|v| v.to_str().ok());
        if !expires.is_some_and(|e| e.len() >= 20 && e.as_bytes()[10] == b'T' && e.ends_with('Z')) {
            bad(format!(
                "nsm-client-token-expires is not RFC 3339 UTC: {expires:?}"
            ));
        }
        if !conn.id.starts_with(&format!("{}-", self.name)) {
            bad(format!("id {:?} is not <NSM_NAME>-<i>", conn.id));
        }
        if conn.index() != 0 {
            bad(format!("path index {}", conn.index()));
        }
        match conn.segments().first() {
            Some(s) => {
                if s.name != self.name || s.id != conn.id {
                    bad(format!("segment 0 is {:?}/{:?}", s.name, s.id));
                }
                // Segment 0's token and the per-RPC one are the client's
                // (the per-RPC one names the manager as `aud` under TLS).
                let sub = |t: &str| nsm_api::authorize::decode(t).ok().map(|c| c.sub);
                if token.is_none_or(|t| sub(t).is_none() || sub(t) != sub(&s.token)) {
                    bad("segment 0 token and the metadata token have different signers".into());
                }
                let exp = s.expires.as_ref().and_then(from_timestamp);
                if exp.is_none_or(|e| e <= SystemTime::now()) {
                    bad(format!("segment 0 expires {exp:?} is not in the future"));
                }
            }
            None => bad("no path segment 0".into()),
        }
        let pref = msg
            .mechanism_preferences
            .first()
            .cloned()
            .unwrap_or_default();
        if msg.mechanism_preferences.len() != 1 || !pref.is_kernel() || pref.cls != "LOCAL" {
            bad(format!("preferences {:?}", msg.mechanism_preferences));
        }
        if pref.interface_name().is_none() {
            bad("no interface name".into());
        }
        match (pref.inode_url(), fds) {
            (Ok(url), Some(fds)) => match fds.recv_fd(&url, Duration::from_secs(2)).await {
                Ok(fd) => match Netns::from_fd(fd, "the passed fd") {
                    Ok(ns) if ns.inode_url() == self.netns && url == self.netns => {
                        passed = Some(ns)
                    }
                    Ok(ns) => bad(format!(
                        "passed netns {} (URL {url}), expected {}",
                        ns.inode_url(),
                        self.netns
                    )),
                    Err(e) => bad(e.to_string()),
                },
                Err(e) => bad(format!("no fd for {url}: {e}")),
            },
            (Err(e), _) => bad(format!("inodeURL: {e}")),
            (_, None) => bad("no fd channel".into()),
        }
        (problems, passed)
    }
}

/// What a forwarder would do: the interface, up, with `src`, in the netns
/// whose fd the client passed.
fn build(ns: Netns, pref: &Mechanism, src: &str) -> Result<(), String> {
    let name = pref.interface_name().unwrap_or_default().to_owned();
    let ip = |args: &[&str]| -> Result<std::process::Output, String> {
        let mut c = Command::new("ip");
        c.args(args);
        ns.enter_in_child(&mut c);
        c.output().map_err(|e| e.to_string())
    };
    let ok = |out: std::process::Output| {
        out.status
            .success()
            .then_some(())
            .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
    };
    if !ip(&["link", "show", &name])?.status.success() {
        // A veth pair inside the netns: this kernel has no dummy driver.
        let peer = unique("p");
        ok(ip(&[
            "link", "add", &name, "type", "veth", "peer", "name", &peer,
        ])?)?;
        ok(ip(&["link", "set", &peer, "up"])?)?;
    }
    ok(ip(&["addr", "replace", src, "dev", &name])?)?;
    ok(ip(&["link", "set", &name, "up"])?)
}

#[tonic::async_trait]
impl NetworkService for Manager {
    async fn request(
        &self,
        req: Request<NetworkServiceRequest>,
    ) -> Result<Response<Connection>, Status> {
        let peer = Peer::of(req.extensions());
        let fds = peer.fds.clone();
        let md = req.metadata().clone();
        let msg = req.into_inner();
        let (problems, passed) = self.check(&md, fds, &msg).await;
        let mut conn = msg.connection.clone().unwrap_or_default();
        let pref = msg
            .mechanism_preferences
            .first()
            .cloned()
            .unwrap_or_default();
        self.seen.lock().unwrap().push(Seen::Request {
            conn: conn.clone(),
            pref: pref.clone(),
            problems: problems.clone(),
        });
        if !problems.is_empty() {
            return Err(Status::invalid_argument(problems.join("; ")));
        }
        let is_refresh = conn.segments().len() > 1;
        if is_refresh && self.refuse_refresh.swap(false, Ordering::SeqCst) {
            return Err(Status::failed_precondition("fake: connection expired here"));
        }
        if self.answer == Answer::NotFound {
            return Err(Status::not_found(format!(
                "network service {:?} is not registered",
                conn.network_service
            )));
        }
        let i: u32 = conn
            .id
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let (src, dst) = addresses(i);
        if let (Answer::Up, Some(ns)) = (self.answer, passed) {
            let (pref, src) = (pref.clone(), src.clone());
            tokio::task::spawn_blocking(move || build(ns, &pref, &src))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(Status::internal)?;
        }
        conn.mechanism = Some(pref);
        conn.context = Some(ConnectionContext {
            ip_context: Some(IpContext {
                src_ip_addrs: vec![src],
                dst_ip_addrs: vec![dst],
                ..Default::default()
            }),
            ..Default::default()
        });
        conn.network_service_endpoint_name = "fake-nse".into();
        let token = match &self.signer {
            Some(signer) if !self.forge => {
                TokenIssuer::svid(signer.clone(), self.lifetime)
                    .issue_for(peer.svid.as_ref())
                    .map_err(|e| Status::internal(e.to_string()))?
                    .jwt
            }
            _ => "fake".into(),
        };
        let path = conn.path.get_or_insert_with(Default::default);
        path.path_segments.truncate(1);
        if self.signer.is_some() {
            // nsmgr's updatetoken: the client's per-RPC token, for us, in its segment.
            if let (Some(seg), Some(t)) = (
                path.path_segments.first_mut(),
                md.get(TOKEN_METADATA).and_then(|v| v.to_str().ok()),
            ) {
                seg.token = t.to_owned();
            }
        }
        path.path_segments.push(PathSegment {
            name: "fake-nsmgr".into(),
            id: format!("fake-{}", conn.id),
            token,
            expires: Some(to_timestamp(SystemTime::now() + self.lifetime)),
            ..Default::default()
        });
        Ok(Response::new(conn))
    }

    async fn close(&self, req: Request<Connection>) -> Result<Response<()>, Status> {
        self.seen
            .lock()
            .unwrap()
            .push(Seen::Close(req.into_inner()));
        Ok(Response::new(()))
    }
}

/// The fake on its own runtime and socket; stops on drop.
struct Fake {
    dir: PathBuf,
    socket: PathBuf,
    seen: Arc<Mutex<Vec<Seen>>>,
    refuse_refresh: Arc<AtomicBool>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Fake {
    fn start(answer: Answer, name: &str, netns: InodeUrl, lifetime: Duration) -> Fake {
        Fake::start_with(answer, name, netns, lifetime, None, false)
    }

    /// With `tls`, served over mTLS by nsm-api's transport (as nsmgr would),
    /// its segment signed unless `forge`.
    fn start_with(
        answer: Answer,
        name: &str,
        netns: InodeUrl,
        lifetime: Duration,
        tls: Option<Arc<Identity>>,
        forge: bool,
    ) -> Fake {
        let dir = std::env::temp_dir().join(unique("nscfake"));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("nsm.io.sock");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let refuse_refresh = Arc::new(AtomicBool::new(false));
        let manager = Manager {
            answer,
            name: name.to_owned(),
            netns,
            lifetime,
            seen: seen.clone(),
            refuse_refresh: refuse_refresh.clone(),
            signer: tls.clone(),
            forge,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        if let Some(tls) = tls {
            let listen = Listen::Unix {
                path: socket.clone(),
                group: None,
            };
            rt.spawn(async move {
                serve(
                    &listen,
                    Some(tls),
                    manager,
                    MonitorHub::new(),
                    std::future::pending(),
                )
                .await
            });
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::os::unix::net::UnixStream::connect(&socket).is_err() {
                assert!(Instant::now() < deadline, "the TLS fake did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            let listener = rt
                .block_on(async { tokio::net::UnixListener::bind(&socket) })
                .unwrap();
            rt.spawn(
                tonic::transport::Server::builder()
                    .add_service(NetworkServiceServer::new(manager))
                    .serve_with_incoming(grpcfd::incoming(listener)),
            );
        }
        Fake {
            dir,
            socket,
            seen,
            refuse_refresh,
            rt: Some(rt),
        }
    }

    fn connect_to(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn requests(&self) -> Vec<Req> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::Request {
                    conn,
                    pref,
                    problems,
                } => Some((conn, pref, problems)),
                Seen::Close(_) => None,
            })
            .collect()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------- running nsc-init

fn netns_url(path: &Path) -> InodeUrl {
    let md = std::fs::metadata(path).unwrap();
    InodeUrl::new(md.dev(), md.ino())
}

/// nsc-init with the env every run needs (NSM_* first, as the webhook sets them).
fn nsc_init(cmd: Command, name: &str, connect_to: &str, services: &str) -> Command {
    let mut cmd = cmd;
    cmd.env("NSM_NAME", name)
        .env("NSM_CONNECT_TO", connect_to)
        .env("NSM_NETWORK_SERVICES", services)
        .env("NSM_INSECURE", "true")
        .env("NSM_LOG_LEVEL", "DEBUG")
        .env_remove("NSM_LABELS")
        .env_remove("POD_NAME");
    cmd
}

fn direct() -> Command {
    Command::new(bin("nsc-init"))
}

fn in_ns(ns: &TestNetns) -> Command {
    ns.command(bin("nsc-init").to_str().unwrap())
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Finished {
    fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

impl std::fmt::Display for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?} after {:?}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.took, self.stdout, self.stderr
        )
    }
}

/// Runs to completion (killed after `limit`), collecting both streams.
fn run(mut cmd: Command, limit: Duration) -> Finished {
    let start = Instant::now();
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = ChildGuard::spawn(&mut cmd);
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.0.stdout.take().unwrap()));
    let err = drain(Box::new(child.0.stderr.take().unwrap()));
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < limit,
            "nsc-init still running after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    Finished {
        status,
        took: start.elapsed(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// The last stderr line, the one-line reason.
fn reason(f: &Finished) -> &str {
    f.stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("nsc-init: "))
        .unwrap_or("")
}

// ---------------------------------------------------------------- tests

#[test]
fn brings_every_service_up_in_its_own_netns() {
    if !require_root("brings_every_service_up_in_its_own_netns") {
        return;
    }
    let ns = TestNetns::new("nsci");
    let name = unique("web");
    let fake = Fake::start(
        Answer::Up,
        &name,
        netns_url(Path::new(&ns.path())),
        Duration::from_secs(600),
    );
    let mut cmd = nsc_init(
        in_ns(&ns),
        &name,
        &fake.connect_to(),
        "kernel://mesh-proxy/nsm-1?app=web,kernel://second-service",
    );
    cmd.env("NSM_LABELS", "team:blue").env("POD_NAME", "web-0");
    let f = run(cmd, Duration::from_secs(30));
    assert_eq!(f.code(), 0, "{f}");

    let lines: Vec<&str> = f.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{f}");
    assert_eq!(
        lines[0],
        "nsc-init: kernel://mesh-proxy/nsm-1?app=web up: nsm-1 198.18.0.1/32 -> 198.18.0.0/32"
    );
    // No name in the URL: `<service[:10]>-<random>`, 15 bytes, like NSM's kernel client.
    let rest = lines[1]
        .strip_prefix("nsc-init: kernel://second-service up: ")
        .unwrap_or_else(|| panic!("{f}"));
    let generated = rest.split(' ').next().unwrap();
    assert!(
        generated.starts_with("second-ser-") && generated.len() == 15,
        "{f}"
    );
    assert!(rest.ends_with(" 198.18.0.3/32 -> 198.18.0.2/32"), "{f}");

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2, "{:?}", fake.seen());
    for (i, (conn, pref, problems)) in reqs.iter().enumerate() {
        assert!(problems.is_empty(), "request {i}: {problems:?}");
        assert_eq!(conn.id, format!("{name}-{i}"));
        assert_eq!(conn.labels["team"], "blue");
        assert_eq!(conn.labels["podName"], "web-0");
        assert_eq!(
            pref.param(keys::INODE_URL),
            Some(netns_url(Path::new(&ns.path())).to_string().as_str())
        );
    }
    assert_eq!(reqs[0].0.network_service, "mesh-proxy");
    assert_eq!(reqs[0].0.labels["app"], "web");
    assert_eq!(reqs[1].1.interface_name(), Some(generated));
    // The interfaces are in the test netns only.
    let addrs = ns.exec_ok(&["ip", "-o", "addr", "show"]);
    assert!(
        addrs.contains("nsm-1") && addrs.contains("198.18.0.1/32"),
        "{addrs}"
    );
}

#[test]
fn unreachable_manager_exits_3_after_the_request_timeout() {
    let name = unique("web");
    let dir = std::env::temp_dir().join(unique("nscnone"));
    let cmd = nsc_init(
        direct(),
        &name,
        &format!("unix://{}/nsm.io.sock", dir.display()),
        "kernel://mesh-proxy/nsm-1",
    );
    let mut cmd = cmd;
    cmd.env("NSM_REQUEST_TIMEOUT", "1s");
    let f = run(cmd, Duration::from_secs(20));
    assert_eq!(f.code(), 3, "{f}");
    assert!(f.took >= Duration::from_secs(1), "{f}");
    let why = reason(&f);
    assert!(
        why.starts_with("nsc-init: kernel://mesh-proxy/nsm-1: "),
        "{f}"
    );
    assert!(
        why.contains("unreachable") && why.contains("No such file"),
        "{f}"
    );
    assert!(f.stdout.is_empty(), "{f}");
}

#[test]
fn unknown_service_is_refused_at_once_with_the_managers_message() {
    let name = unique("web");
    // nsc-init runs in our netns here: the fake only checks and refuses.
    let fake = Fake::start(
        Answer::NotFound,
        &name,
        netns_url(Path::new("/proc/self/ns/net")),
        Duration::from_secs(600),
    );
    let mut cmd = nsc_init(
        direct(),
        &name,
        &fake.connect_to(),
        "kernel://no-such-service/nsm-1",
    );
    cmd.env("NSM_REQUEST_TIMEOUT", "30s");
    let f = run(cmd, Duration::from_secs(20));
    assert_eq!(f.code(), 1, "{f}");
    let why = reason(&f);
    assert!(
        why.starts_with("nsc-init: kernel://no-such-service/nsm-1: "),
        "{f}"
    );
    assert!(why.contains("NotFound"), "{f}");
    assert!(
        why.contains("network service \"no-such-service\" is not registered"),
        "{f}"
    );
    // Not retried: one request, whatever the 30s budget.
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1, "{:?}", fake.seen());
    assert!(reqs[0].2.is_empty(), "request shape: {:?}", reqs[0].2);
}

#[test]
fn interface_that_never_appears_exits_4() {
    if !require_root("interface_that_never_appears_exits_4") {
        return;
    }
    let ns = TestNetns::new("nsci");
    let name = unique("web");
    let fake = Fake::start(
        Answer::NoInterface,
        &name,
        netns_url(Path::new(&ns.path())),
        Duration::from_secs(600),
    );
    let mut cmd = nsc_init(
        in_ns(&ns),
        &name,
        &fake.connect_to(),
        "kernel://mesh-proxy/nsm-1",
    );
    cmd.env("NSM_REQUEST_TIMEOUT", "1s");
    let f = run(cmd, Duration::from_secs(20));
    assert_eq!(f.code(), 4, "{f}");
    let why = reason(&f);
    assert!(
        why.starts_with("nsc-init: kernel://mesh-proxy/nsm-1: nsm-1 not ready"),
        "{f}"
    );
    assert!(why.contains("no such interface"), "{f}");
    assert!(f.stdout.is_empty(), "{f}");
}

#[test]
fn bad_configuration_exits_64_with_one_line() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("NSM_NETWORK_SERVICES", "")],
            "NSM_NETWORK_SERVICES is empty",
        ),
        (
            &[("NSM_NETWORK_SERVICES", "mesh-proxy")],
            "NSM_NETWORK_SERVICES",
        ),
        (
            &[(
                "NSM_NETWORK_SERVICES",
                "kernel://svc/an-interface-name-too-long",
            )],
            "longer than 15",
        ),
        (&[("NSM_REQUEST_TIMEOUT", "15")], "NSM_REQUEST_TIMEOUT"),
        (&[("NSM_CONNECT_TO", "/var/lib/nsm.sock")], "NSM_CONNECT_TO"),
        (
            &[("NSM_INSECURE", "false")],
            "no identity: set SPIFFE_ENDPOINT_SOCKET",
        ),
        (
            &[
                ("NSM_INSECURE", "false"),
                ("NSM_SVID_CERT_FILE", "/svid.pem"),
            ],
            "NSM_SVID_KEY_FILE, NSM_TRUST_BUNDLE_FILE must be set with NSM_SVID_CERT_FILE",
        ),
        (&[("NSC_VALIDATE", "true")], "NSC_VALIDATE_PROBE"),
        // Hops close at the token's expiry minus the request timeout.
        (
            &[("NSM_MAX_TOKEN_LIFETIME", "3s")],
            "NSM_MAX_TOKEN_LIFETIME 3s must be longer than NSM_REQUEST_TIMEOUT 15s",
        ),
    ];
    for (env, want) in cases {
        let mut cmd = nsc_init(
            direct(),
            "web",
            "unix:///nonexistent/nsm.sock",
            "kernel://svc/nsm-1",
        );
        for (k, v) in *env {
            cmd.env(k, v);
        }
        let f = run(cmd, Duration::from_secs(10));
        assert_eq!(f.code(), 64, "{env:?}: {f}");
        assert_eq!(f.stderr.lines().count(), 1, "{env:?}: {f}");
        assert!(reason(&f).contains(want), "{env:?}: {f}");
    }
    // A usage error is clap's exit 2.
    let mut cmd = direct();
    cmd.arg("--no-such-flag");
    let f = run(cmd, Duration::from_secs(10));
    assert_eq!(f.code(), 2, "{f}");
}

#[test]
fn help_documents_every_variable_and_exit_code() {
    let mut cmd = direct();
    cmd.arg("--help");
    let f = run(cmd, Duration::from_secs(10));
    assert_eq!(f.code(), 0, "{f}");
    for var in [
        "NSM_NETWORK_SERVICES",
        "NSM_NAME",
        "NSM_CONNECT_TO",
        "NSM_DIAL_TIMEOUT",
        "NSM_REQUEST_TIMEOUT",
        "NSM_MAX_TOKEN_LIFETIME",
        "NSM_LABELS",
        "NSM_LOG_LEVEL",
        "NSM_INSECURE",
        "SPIFFE_ENDPOINT_SOCKET",
        "NSM_SVID_CERT_FILE",
        "NSM_SVID_KEY_FILE",
        "NSM_TRUST_BUNDLE_FILE",
        "NSC_VALIDATE",
        "NSC_VALIDATE_PROBE",
        "NSC_VALIDATE_EXPECT",
        "NSC_VALIDATE_TIMEOUT",
        "NSC_WATCH",
        "POD_NAME",
    ] {
        assert!(f.stdout.contains(var), "--help lacks {var}");
    }
    for code in ["  0 ", "  1 ", "  2 ", "  3 ", "  4 ", "  5 ", "  64 "] {
        assert!(f.stdout.contains(code), "--help lacks exit code {code:?}");
    }
}

/// A TCP server inside a namespace that greets every connection; stops on drop.
struct Greeter {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Greeter {
    fn start(ns: &TestNetns, greeting: &'static [u8]) -> Greeter {
        let listener = Netns::open(&ns.path())
            .unwrap()
            .run(|| std::net::TcpListener::bind("0.0.0.0:0"))
            .unwrap()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        use std::io::Write;
                        let _ = s.write_all(greeting);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Greeter {
            // The address nsc-init's first interface gets.
            addr: SocketAddr::new("198.18.0.1".parse().unwrap(), port),
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn validate_checks_the_probe_answer() {
    if !require_root("validate_checks_the_probe_answer") {
        return;
    }
    let ns = TestNetns::new("nsci");
    let name = unique("web");
    let fake = Fake::start(
        Answer::Up,
        &name,
        netns_url(Path::new(&ns.path())),
        Duration::from_secs(600),
    );
    let greeter = Greeter::start(&ns, b"MESH-PROXY ready\r\n");
    let with = |expect: &str, probe: SocketAddr| {
        let mut cmd = nsc_init(
            in_ns(&ns),
            &name,
            &fake.connect_to(),
            "kernel://mesh-proxy/nsm-1",
        );
        cmd.env("NSC_VALIDATE", "true")
            .env("NSC_VALIDATE_PROBE", probe.to_string())
            .env("NSC_VALIDATE_EXPECT", expect)
            .env("NSC_VALIDATE_TIMEOUT", "700ms");
        run(cmd, Duration::from_secs(30))
    };
    let ok = with("MESH-PROXY", greeter.addr);
    assert_eq!(ok.code(), 0, "{ok}");
    assert!(ok.stdout.contains("up: nsm-1 198.18.0.1/32"), "{ok}");

    let wrong = with("HTTP/1.1", greeter.addr);
    assert_eq!(wrong.code(), 5, "{wrong}");
    let why = reason(&wrong);
    assert!(
        why.contains("expected a response starting with \"HTTP/1.1\""),
        "{wrong}"
    );
    assert!(why.contains("MESH-PROXY ready"), "{wrong}");
    assert!(wrong.stdout.is_empty(), "{wrong}");

    let mut closed = greeter.addr;
    closed.set_port(1);
    let refused = with("MESH-PROXY", closed);
    assert_eq!(refused.code(), 5, "{refused}");
    assert!(reason(&refused).contains("refused"), "{refused}");
}

#[test]
fn watch_refreshes_heals_and_closes_on_sigterm() {
    if !require_root("watch_refreshes_heals_and_closes_on_sigterm") {
        return;
    }
    let ns = TestNetns::new("nsci");
    let name = unique("web");
    let lifetime = Duration::from_secs(3);
    let fake = Fake::start(
        Answer::Up,
        &name,
        netns_url(Path::new(&ns.path())),
        lifetime,
    );
    let mut cmd = nsc_init(
        in_ns(&ns),
        &name,
        &fake.connect_to(),
        "kernel://mesh-proxy/nsm-1",
    );
    cmd.env("NSC_WATCH", "true")
        .env("NSM_MAX_TOKEN_LIFETIME", "3s")
        // Below the lifetime: hops close at expiry minus the request timeout.
        .env("NSM_REQUEST_TIMEOUT", "1s")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard::spawn(&mut cmd);
    let (tx, rx) = mpsc::channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr = child.0.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut s);
        s
    });
    let up = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the up line");
    assert!(
        up.starts_with("nsc-init: kernel://mesh-proxy/nsm-1 up: nsm-1 "),
        "{up}"
    );

    // Refreshes: re-sent returned connections (with the fake's segment), a
    // fresh token in segment 0, our netns fd passed again.
    let wait_for = |what: &str, pred: &dyn Fn(&[Req]) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(8);
        while !pred(&fake.requests()) {
            assert!(Instant::now() < deadline, "{what}: {:#?}", fake.requests());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let refreshes = |r: &[Req]| r.iter().filter(|(c, _, _)| c.segments().len() == 2).count();
    wait_for("two refreshes", &|r| refreshes(r) >= 2);
    let reqs = fake.requests();
    for (conn, _, problems) in &reqs {
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(conn.id, format!("{name}-0"));
    }
    let tokens: std::collections::HashSet<&str> = reqs
        .iter()
        .map(|(c, _, _)| c.segments()[0].token.as_str())
        .collect();
    assert_eq!(
        tokens.len(),
        reqs.len(),
        "every attempt carries a fresh token"
    );
    let refresh = reqs
        .iter()
        .find(|(c, _, _)| c.segments().len() == 2)
        .unwrap();
    assert_eq!(refresh.0.segments()[1].name, "fake-nsmgr");
    assert_eq!(
        refresh
            .0
            .mechanism
            .as_ref()
            .and_then(|m| m.interface_name()),
        Some("nsm-1"),
        "a refresh re-sends the returned connection"
    );

    // Heal: a refused refresh is followed by a request from scratch.
    let before = fake.requests().len();
    fake.refuse_refresh.store(true, Ordering::SeqCst);
    wait_for("a re-request from scratch after the refusal", &|r| {
        r.len() > before + 1
            && r[before + 1..]
                .iter()
                .any(|(c, _, _)| c.segments().len() == 1)
    });
    wait_for("refreshes again after healing", &|r| {
        let healed = r[before..]
            .iter()
            .position(|(c, _, _)| c.segments().len() == 1)
            .unwrap_or(r.len());
        r.get(before + healed + 1..)
            .is_some_and(|rest| rest.iter().any(|(c, _, _)| c.segments().len() == 2))
    });

    let status = child
        .terminate(Duration::from_secs(10))
        .expect("nsc-init exits after SIGTERM");
    let log = log.join().unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    let closes: Vec<Connection> = fake
        .seen()
        .into_iter()
        .filter_map(|s| match s {
            Seen::Close(c) => Some(c),
            Seen::Request { .. } => None,
        })
        .collect();
    assert_eq!(closes.len(), 1, "{log}");
    assert_eq!(closes[0].id, format!("{name}-0"));
    assert_eq!(
        closes[0].segments().len(),
        2,
        "Close carries the last returned connection"
    );
    assert!(
        log.contains("refreshed"),
        "refreshes are logged at debug: {log}"
    );
}

/// Under mTLS nsc-init checks the path the manager returns as sdk's
/// authorize client does (tokens valid, chained, alive; the manager's
/// segment signed by the manager's certificate): a path that fails is
/// Closed and refused (exit 1, PermissionDenied, which policy); one that
/// keeps them is accepted.
#[test]
fn under_tls_the_returned_path_must_keep_nsms_client_policies() {
    if !require_root("under_tls_the_returned_path_must_keep_nsms_client_policies") {
        return;
    }
    let ca = examples::svid::TestCa::new("k8s.nsm").unwrap();
    let ns = TestNetns::new("nscs");
    let name = unique("web");
    let svid_dir = std::env::temp_dir().join(unique("nscsvid"));
    std::fs::create_dir_all(&svid_dir).unwrap();
    let files = ca
        .write(&ca.issue("/ns/default/pod/web-0").unwrap(), &svid_dir)
        .unwrap();
    let nsmgr = Identity::new(
        ca.material(&ca.issue("/ns/nsm-system/pod/nsmgr").unwrap())
            .unwrap(),
    );
    for forge in [false, true] {
        let fake = Fake::start_with(
            Answer::Up,
            &name,
            netns_url(Path::new(&ns.path())),
            Duration::from_secs(600),
            Some(nsmgr.clone()),
            forge,
        );
        let mut cmd = nsc_init(
            in_ns(&ns),
            &name,
            &fake.connect_to(),
            "kernel://mesh-proxy/nsm-1",
        );
        cmd.env("NSM_INSECURE", "false")
            .env("NSM_SVID_CERT_FILE", &files.cert)
            .env("NSM_SVID_KEY_FILE", &files.key)
            .env("NSM_TRUST_BUNDLE_FILE", &files.bundle);
        let f = run(cmd, Duration::from_secs(30));
        let closes = fake
            .seen()
            .iter()
            .filter(|s| matches!(s, Seen::Close(_)))
            .count();
        if forge {
            assert_eq!(f.code(), 1, "a forged path must be refused: {f}");
            assert!(reason(&f).contains("PermissionDenied"), "{f}");
            assert!(reason(&f).contains("tokens_valid"), "{f}");
            assert_eq!(closes, 1, "the refused connection must be Closed: {f}");
        } else {
            assert_eq!(f.code(), 0, "a path that keeps the policies: {f}");
            assert_eq!(closes, 0, "{f}");
        }
    }
    let _ = std::fs::remove_dir_all(&svid_dir);
}
