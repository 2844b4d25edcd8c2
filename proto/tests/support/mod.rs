//! A real tonic NetworkService over a unix socket in a temp dir, speaking grpcfd.
//!
//! What the test server does is driven by the first mechanism preference's parameters:
//! * `send`: comma list of `netns` (its /proc/thread-self/ns/net), `tempfile`
//!   (an unlinked file holding `TEMPFILE_CONTENT`), `pipes:N` (N pipe read ends);
//!   each sent fd's URL comes back as a parameter (`netns`, `tempfile`, `pipe0`..).
//! * `recv`: an inode URL the handler fetches from its connection's FdChannel
//!   (within `recv_timeout_ms`, default 2000); the file's content comes back as `received`.
//! * `pad`: N bytes of `pad_byte(i)` come back as `pad` (checks that no byte is lost).

// Each test binary uses part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use nsm_api::connection::{Connection, Mechanism};
use nsm_api::grpcfd::{self, FdChannel};
use nsm_api::inode::InodeUrl;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::networkservice::network_service_client::NetworkServiceClient;
use nsm_api::networkservice::network_service_server::{NetworkService, NetworkServiceServer};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint, Server, Uri};
use tonic::{Request, Response, Status};

pub const TEMPFILE_CONTENT: &str = "grpcfd test file";

pub fn pad_byte(i: usize) -> char {
    char::from(b'a' + (i % 26) as u8)
}

/// A unique directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nsm-grpcfd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
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

/// An unlinked temp file holding `content`, positioned at its start.
pub fn temp_file(dir: &Path, content: &str) -> File {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path = dir.join(format!("f{}", NEXT.fetch_add(1, Ordering::Relaxed)));
    let mut f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create temp file");
    std::fs::remove_file(&path).expect("unlink temp file");
    f.write_all(content.as_bytes()).unwrap();
    f.rewind().unwrap();
    f
}

pub fn read_all(fd: OwnedFd) -> String {
    let mut f = File::from(fd);
    f.rewind().unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    s
}

pub fn own_netns_url() -> InodeUrl {
    let f = File::open("/proc/thread-self/ns/net").unwrap();
    grpcfd::inode_url_of(f.as_fd()).unwrap()
}

struct TestService {
    dir: PathBuf,
}

impl TestService {
    fn queue(
        &self,
        fds: &FdChannel,
        what: &str,
        out: &mut HashMap<String, String>,
    ) -> Result<(), Status> {
        let queue = |f: &dyn AsFd| {
            fds.send_fd(f.as_fd())
                .map(|u| u.to_string())
                .map_err(|e| Status::internal(format!("send_fd: {e}")))
        };
        if what == "netns" {
            let f = File::open("/proc/thread-self/ns/net")
                .map_err(|e| Status::internal(e.to_string()))?;
            out.insert("netns".into(), queue(&f)?);
        } else if what == "tempfile" {
            let f = temp_file(&self.dir, TEMPFILE_CONTENT);
            out.insert("tempfile".into(), queue(&f)?);
        } else if let Some(n) = what.strip_prefix("pipes:") {
            let n: usize = n.parse().map_err(|_| Status::invalid_argument("pipes:N"))?;
            for i in 0..n {
                // Both ends close when this scope ends; the queued dup keeps the read end alive.
                let (r, _w) = nix::unistd::pipe().map_err(|e| Status::internal(e.to_string()))?;
                out.insert(format!("pipe{i}"), queue(&r)?);
            }
        } else if !what.is_empty() {
            return Err(Status::invalid_argument(format!(
                "unknown send item {what:?}"
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl NetworkService for TestService {
    async fn request(
        &self,
        request: Request<NetworkServiceRequest>,
    ) -> Result<Response<Connection>, Status> {
        let fds = request
            .extensions()
            .get::<FdChannel>()
            .cloned()
            .ok_or_else(|| Status::failed_precondition("no FdChannel in request extensions"))?;
        let params = request
            .get_ref()
            .mechanism_preferences
            .first()
            .map(|m| m.parameters.clone())
            .unwrap_or_default();
        let mut out = HashMap::new();
        if let Some(url) = params.get("recv") {
            let url: InodeUrl = url
                .parse()
                .map_err(|e| Status::invalid_argument(format!("{e}")))?;
            let timeout = params
                .get("recv_timeout_ms")
                .and_then(|v| v.parse().ok())
                .map_or(Duration::from_secs(2), Duration::from_millis);
            let fd = fds
                .recv_fd(&url, timeout)
                .await
                .map_err(|e| Status::not_found(format!("recv_fd: {e}")))?;
            out.insert("received".into(), read_all(fd));
        }
        for what in params
            .get("send")
            .map(String::as_str)
            .unwrap_or("")
            .split(',')
        {
            self.queue(&fds, what, &mut out)?;
        }
        if let Some(n) = params.get("pad") {
            let n: usize = n.parse().map_err(|_| Status::invalid_argument("pad"))?;
            out.insert("pad".into(), (0..n).map(pad_byte).collect());
        }
        Ok(Response::new(Connection {
            mechanism: Some(Mechanism {
                cls: "LOCAL".into(),
                r#type: "KERNEL".into(),
                parameters: out,
            }),
            ..Default::default()
        }))
    }

    async fn close(&self, _request: Request<Connection>) -> Result<Response<()>, Status> {
        Ok(Response::new(()))
    }
}

/// The test server; stops (and removes its temp dir) on drop.
pub struct TestServer {
    pub socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    dir: TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        let dir = TempDir::new();
        let socket = dir.path().join("nse.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = TestService {
            dir: dir.path().to_path_buf(),
        };
        let task = tokio::spawn(async move {
            Server::builder()
                .add_service(NetworkServiceServer::new(svc))
                .serve_with_incoming_shutdown(grpcfd::incoming(listener), async {
                    let _ = stopped.await;
                })
                .await
                .expect("server");
        });
        Self {
            socket,
            stop: Some(stop),
            task: Some(task),
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A request whose first preference carries `params`.
pub fn request(params: &[(&str, &str)]) -> NetworkServiceRequest {
    NetworkServiceRequest {
        connection: Some(Connection::default()),
        mechanism_preferences: vec![Mechanism {
            cls: "LOCAL".into(),
            r#type: "KERNEL".into(),
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }],
    }
}

pub fn params(conn: &Connection) -> &HashMap<String, String> {
    &conn
        .mechanism
        .as_ref()
        .expect("mechanism in response")
        .parameters
}

pub async fn grpcfd_client(socket: &Path) -> (NetworkServiceClient<Channel>, FdChannel) {
    let (channel, fds) = grpcfd::dial(socket).await.expect("dial");
    (NetworkServiceClient::new(channel), fds)
}

/// A plain tonic client over a tokio UnixStream, knowing nothing of grpcfd.
pub async fn plain_client(socket: &Path) -> NetworkServiceClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
        .expect("plain dial");
    NetworkServiceClient::new(channel)
}

/// A tonic client that reads with plain `read(2)` (no control buffer), like a
/// Go gRPC client without grpcfd: the kernel closes any fd it is sent.
///
/// Not tokio's UnixStream reads: those treat a short read as "drained" and
/// stall when the kernel ends a read at an fd-carrying byte (see grpcfd docs).
pub async fn fd_ignoring_client(socket: &Path) -> NetworkServiceClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                UnixStream::connect(socket)
                    .await
                    .map(|s| TokioIo::new(IgnoreFds(s)))
            }
        }))
        .await
        .expect("fd-ignoring dial");
    NetworkServiceClient::new(channel)
}

struct IgnoreFds(UnixStream);

impl AsyncRead for IgnoreFds {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let io = &self.get_mut().0;
        loop {
            ready!(io.poll_read_ready(cx))?;
            let dst = buf.initialize_unfilled();
            match io.try_io(Interest::READABLE, || {
                nix::unistd::read(io, dst).map_err(io::Error::from)
            }) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for IgnoreFds {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Entries in /proc/self/fd.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}
