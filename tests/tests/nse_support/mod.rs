//! Drives `mesh-proxy-nse` as a separate process over a real unix socket, the
//! way an NSM forwarder does: a fresh grpcfd connection per call,
//! `nsm-client-token` metadata, and NSM's 3-segment incoming path
//! `[nsc c0, nsmgr m1, fwd f2]` at index 2 with preferences `[MEMIF, KERNEL]`.

// Each nse_* suite uses part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use nsm_api::connection::monitor_connection_client::MonitorConnectionClient;
use nsm_api::connection::{
    Connection, ConnectionEvent, ConnectionEventType, Mechanism, MonitorScopeSelector,
    Path as NsmPath, PathSegment,
};
use nsm_api::grpcfd::{self, FdChannel};
use nsm_api::inode::InodeUrl;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::networkservice::network_service_client::NetworkServiceClient;
use nsm_api::path::to_timestamp;
use nsm_tests::netns::TestNetns;
use nsm_tests::process::{ChildGuard, bin, fd_count};
use tonic::Streaming;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub const SERVICE: &str = "mesh-proxy";
/// How long anything in these suites may take before it counts as hung.
pub const WAIT: Duration = Duration::from_secs(10);

/// A temp directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(nsm_tests::unique("nse"));
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

/// A running `mesh-proxy-nse`, killed on drop; its stderr is printed if the test fails.
pub struct Nse {
    pub child: ChildGuard,
    pub name: String,
    pub socket: PathBuf,
    log: PathBuf,
    /// The namespace the NSE runs in (as root), deleted after the NSE is killed.
    pub netns: Option<TestNetns>,
    _dir: TempDir,
}

/// How to start an NSE beyond its environment.
#[derive(Default)]
pub struct StartOptions {
    /// The namespace to run in (root only); `None`: a fresh one as root,
    /// the test's own otherwise.
    pub netns: Option<TestNetns>,
    /// A program (and its arguments) the NSE runs under inside the
    /// namespace, e.g. `setpriv` to drop privileges to uid/gid 65534; its
    /// socket directory is then that user's.
    pub wrapper: Vec<String>,
}

impl Nse {
    /// Starts the NSE with NSM_INSECURE=true, a private socket and `env`, and waits until it is SERVING.
    ///
    /// As root it runs in a namespace of its own with its default
    /// configuration (placement proxy installs rules there, never in the
    /// test's namespace); without root it cannot install rules, so it gets
    /// a configuration with placement sidecar (unless `env` sets NSM_CONFIG).
    pub async fn start(env: &[(&str, &str)]) -> Nse {
        Self::start_with(env, StartOptions::default()).await
    }

    pub async fn start_with(env: &[(&str, &str)], opts: StartOptions) -> Nse {
        let dir = TempDir::new();
        let socket = env
            .iter()
            .find(|(k, _)| *k == "NSM_LISTEN_ON")
            .and_then(|(_, v)| v.strip_prefix("unix://"))
            .map_or_else(|| dir.path().join("nse.sock"), PathBuf::from);
        let log = dir.path().join("nse.log");
        let name = nsm_tests::unique("nse-");
        // Without root only placement sidecar can run: a skip of the proxy
        // placement that must not pass silently in CI.
        assert!(
            is_root() || !nsm_tests::in_ci(),
            "the NSE suites need root for placement proxy; CI=true, so this is a failure, not a fallback to sidecar"
        );
        let netns = opts
            .netns
            .or_else(|| is_root().then(|| TestNetns::new("nse")));
        let program = bin("mesh-proxy-nse");
        let program = program.to_str().expect("utf-8 path");
        let mut cmd = match (&netns, opts.wrapper.split_first()) {
            (Some(ns), Some((wrapper, args))) => {
                // The wrapper's user (65534, see its callers) makes the
                // socket; a socket directory others may write to is refused.
                nix::unistd::chown(
                    dir.path(),
                    Some(nix::unistd::Uid::from_raw(65534)),
                    Some(nix::unistd::Gid::from_raw(65534)),
                )
                .expect("chown the socket directory");
                let mut c = ns.command(wrapper);
                c.args(args).arg(program);
                c
            }
            (Some(ns), None) => ns.command(program),
            (None, _) => Command::new(program),
        };
        cmd.env_clear()
            .env("NSM_INSECURE", "true")
            .env("NSM_NAME", &name)
            .env("NSM_LISTEN_ON", format!("unix://{}", socket.display()))
            .env("NSM_LOG_LEVEL", "DEBUG")
            .env("NSM_STATE_DIR", dir.path().join("state"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        if netns.is_none() {
            let config = dir.path().join("sidecar.yaml");
            std::fs::write(&config, "version: 1\nplacement: sidecar\n").expect("config file");
            cmd.env("NSM_CONFIG", &config);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = ChildGuard::spawn(&mut cmd);
        let nse = Nse {
            child,
            name,
            socket,
            log,
            netns,
            _dir: dir,
        };
        nse.wait_serving().await;
        nse
    }

    /// Kills the NSE (SIGKILL: nothing of it runs again) and hands back its namespace.
    pub fn kill(mut self) -> Option<TestNetns> {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        self.netns.take()
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn fds(&self) -> usize {
        fd_count(self.pid())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_serving(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(ServingStatus::Serving) = self.health("networkservice.NetworkService").await {
                return;
            }
            if let Ok(Some(st)) = self.child_status() {
                panic!(
                    "mesh-proxy-nse exited with {st} before serving:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "mesh-proxy-nse not SERVING within {WAIT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn child_status(&self) -> std::io::Result<Option<std::process::ExitStatus>> {
        // try_wait needs &mut; peek at /proc instead of reaping.
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let zombie = stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z'));
        Ok(zombie.then(std::process::ExitStatus::default))
    }

    /// `grpc.health.v1.Health/Check` for `service`.
    pub async fn health(&self, service: &str) -> Result<ServingStatus, tonic::Status> {
        let (ch, _) = grpcfd::dial(&self.socket)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let resp = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await?;
        Ok(ServingStatus::try_from(resp.into_inner().status).unwrap_or(ServingStatus::Unknown))
    }

    /// A fresh connection (as a forwarder dials one per call).
    pub async fn dial(&self) -> (NetworkServiceClient<tonic::transport::Channel>, FdChannel) {
        let (ch, fds) = grpcfd::dial(&self.socket).await.expect("dial the NSE");
        (NetworkServiceClient::new(ch), fds)
    }

    /// Request on a fresh connection with forwarder metadata; returns the connection's fd channel too.
    pub async fn request(
        &self,
        req: NetworkServiceRequest,
    ) -> Result<(Connection, FdChannel), tonic::Status> {
        self.request_with(req, &Metadata::forwarder()).await
    }

    /// Without root the NSE runs in placement sidecar, which it serves only
    /// to a forwarder that announces it applies client redirect rules: the
    /// requests announce it then (as `forwarder-plugin serve` does).
    pub async fn request_with(
        &self,
        mut req: NetworkServiceRequest,
        md: &Metadata,
    ) -> Result<(Connection, FdChannel), tonic::Status> {
        if self.netns.is_none()
            && let Some(c) = req.connection.as_mut()
        {
            forwarder_plugin::hop::announce_features(c);
        }
        let (mut client, fds) = self.dial().await;
        let conn = client.request(md.wrap(req)).await?.into_inner();
        Ok((conn, fds))
    }

    /// Close on a fresh connection with forwarder metadata.
    pub async fn close(&self, conn: Connection) -> Result<FdChannel, tonic::Status> {
        let (mut client, fds) = self.dial().await;
        client.close(Metadata::forwarder().wrap(conn)).await?;
        Ok(fds)
    }

    /// A MonitorConnections stream, checked to start with INITIAL_STATE_TRANSFER; returns it and that first event.
    pub async fn monitor(
        &self,
        selector: MonitorScopeSelector,
    ) -> (Streaming<ConnectionEvent>, ConnectionEvent) {
        let (ch, _) = grpcfd::dial(&self.socket).await.expect("dial the NSE");
        let mut stream = MonitorConnectionClient::new(ch)
            .monitor_connections(selector)
            .await
            .expect("MonitorConnections")
            .into_inner();
        let first = next_event(&mut stream)
            .await
            .expect("initial state transfer");
        assert_eq!(
            first.r#type,
            ConnectionEventType::InitialStateTransfer as i32
        );
        (stream, first)
    }
}

impl Drop for Nse {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- mesh-proxy-nse log ----\n{}", self.log());
        }
        // Fields drop in order: the child is killed before its namespace goes.
    }
}

/// Whether this process runs as root (and so can give the NSE a namespace).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The next monitor event, or None if the stream ended or nothing came within `WAIT`.
pub async fn next_event(stream: &mut Streaming<ConnectionEvent>) -> Option<ConnectionEvent> {
    next_event_within(stream, WAIT).await
}

pub async fn next_event_within(
    stream: &mut Streaming<ConnectionEvent>,
    wait: Duration,
) -> Option<ConnectionEvent> {
    match tokio::time::timeout(wait, stream.message()).await {
        Ok(Ok(ev)) => ev,
        Ok(Err(status)) => panic!("monitor stream failed: {status}"),
        Err(_) => None,
    }
}

/// The metadata a forwarder sends with each call.
#[derive(Clone, Debug)]
pub struct Metadata {
    pub token: Option<String>,
    /// `nsm-client-token-expires` as sent (RFC 3339).
    pub expires: Option<String>,
    /// The instant `expires` names.
    pub expires_at: Option<SystemTime>,
    pub timeout: Option<Duration>,
}

impl Metadata {
    /// `nsm-client-token`/`-expires` valid for 10 minutes and a 5 s deadline.
    pub fn forwarder() -> Self {
        Self::expiring_in(Duration::from_secs(600), Some(Duration::from_secs(5)))
    }

    pub fn expiring_in(life: Duration, timeout: Option<Duration>) -> Self {
        let at = SystemTime::now() + life;
        Metadata {
            token: Some(format!("fwd-token-{}", nsm_tests::unique("t"))),
            expires: Some(rfc3339(at)),
            expires_at: Some(at),
            timeout,
        }
    }

    /// No token metadata and no deadline.
    pub fn none() -> Self {
        Metadata {
            token: None,
            expires: None,
            expires_at: None,
            timeout: None,
        }
    }

    pub fn wrap<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            r.metadata_mut()
                .insert("nsm-client-token", t.parse().unwrap());
        }
        if let Some(e) = &self.expires {
            r.metadata_mut()
                .insert("nsm-client-token-expires", e.parse().unwrap());
        }
        if let Some(t) = self.timeout {
            r.set_timeout(t);
        }
        r
    }
}

/// Go's RFC3339Nano in UTC.
pub fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn segment(name: &str, id: &str, expires_in: Duration) -> PathSegment {
    PathSegment {
        name: name.into(),
        id: id.into(),
        token: format!("token-of-{name}"),
        expires: Some(to_timestamp(SystemTime::now() + expires_in)),
        ..Default::default()
    }
}

pub fn mechanism(kind: &str) -> Mechanism {
    Mechanism {
        cls: "LOCAL".into(),
        r#type: kind.into(),
        ..Default::default()
    }
}

/// Req(P) of nsm-wire §9 with ids unique to this call: path `[nsc c0, nsmgr m1, fwd f2]`,
/// index 2, `id = f2`, labels `{app: x}`, preferences `[MEMIF, KERNEL]`.
pub fn req_p() -> NetworkServiceRequest {
    let tag = nsm_tests::unique("");
    let (c0, m1, f2) = (
        format!("c0-{tag}"),
        format!("m1-{tag}"),
        format!("f2-{tag}"),
    );
    let life = Duration::from_secs(600);
    NetworkServiceRequest {
        connection: Some(Connection {
            id: f2.clone(),
            network_service: SERVICE.into(),
            labels: HashMap::from([("app".to_string(), "x".to_string())]),
            path: Some(NsmPath {
                index: 2,
                path_segments: vec![
                    segment("nsc", &c0, life),
                    segment("nsmgr", &m1, life),
                    segment("fwd", &f2, life),
                ],
            }),
            ..Default::default()
        }),
        mechanism_preferences: vec![mechanism("MEMIF"), mechanism("KERNEL")],
    }
}

/// The refresh a forwarder sends: the returned connection (mechanism preset, our segment included).
pub fn refresh_of(conn: &Connection) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(conn.clone()),
        mechanism_preferences: vec![mechanism("MEMIF"), mechanism("KERNEL")],
    }
}

pub fn conn_of(req: &NetworkServiceRequest) -> &Connection {
    req.connection.as_ref().unwrap()
}

pub fn conn_mut(req: &mut NetworkServiceRequest) -> &mut Connection {
    req.connection.as_mut().unwrap()
}

pub fn segments(conn: &Connection) -> &[PathSegment] {
    &conn.path.as_ref().unwrap().path_segments
}

/// The endpoint's own segment (the last one of a returned connection).
pub fn nse_segment(conn: &Connection) -> &PathSegment {
    segments(conn).last().unwrap()
}

pub fn ip(conn: &Connection) -> &nsm_api::connectioncontext::IpContext {
    conn.context.as_ref().unwrap().ip_context.as_ref().unwrap()
}

pub fn routes(r: &[nsm_api::connectioncontext::Route]) -> Vec<&str> {
    r.iter().map(|r| r.prefix.as_str()).collect()
}

/// IPAM's point-to-point routes: those without a next hop (the mesh-proxy
/// function's capture routes, in placement proxy, go via the endpoint).
pub fn p2p_routes(r: &[nsm_api::connectioncontext::Route]) -> Vec<&str> {
    r.iter()
        .filter(|r| r.next_hop.is_empty())
        .map(|r| r.prefix.as_str())
        .collect()
}

/// The netns fd that came with a response, checked to be that URL's file.
pub async fn received_netns(fds: &FdChannel, conn: &Connection) -> (InodeUrl, OwnedFd) {
    let m = conn.mechanism.as_ref().expect("mechanism");
    let url: InodeUrl = m.parameters["inodeURL"].parse().expect("inode URL");
    let fd = fds
        .recv_fd(&url, WAIT)
        .await
        .expect("the netns fd on the same connection");
    assert_eq!(grpcfd::inode_url_of(fd.as_fd()).unwrap(), url);
    (url, fd)
}

/// Waits until `f` holds (polling), or panics with `what`.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
