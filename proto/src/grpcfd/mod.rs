//! grpcfd-compatible fd side channel for tonic over unix sockets.
//!
//! The one place `nsm-api` does I/O: passing fds (netns, sockets) beside the
//! gRPC bytes is part of NSM's wire protocol, so every hop needs the same code.
//!
//! Wire behaviour (edwarnicke/grpcfd `connwrap.go`): fds queued with
//! [`FdChannel::send_fd`] go out on the next write on that connection, each on
//! exactly one payload byte (`sendmsg` + `SCM_RIGHTS`), at most 64 per write,
//! then the rest of the bytes as usual. Reads use `recvmsg` with
//! `MSG_CMSG_CLOEXEC`; arriving fds are indexed by `(st_dev, st_ino)` and
//! fetched with [`FdChannel::recv_fd`] by their `inode://dev/ino` URL. A peer
//! that does not speak grpcfd simply never sees the fds (the kernel closes
//! them when it reads the bytes with plain `read`).
//!
//! Caveat for Rust peers without grpcfd: the kernel ends every read at an
//! fd-carrying byte, and tokio's `UnixStream` takes a short read to mean
//! "drained" (it clears read readiness), so a plain tokio/tonic client can
//! stall on a response that carries fds until more bytes arrive. Go clients
//! and [`FdStream`] (which clears readiness only on `EAGAIN`) are unaffected.
//! So Rust clients of fd-sending servers dial with [`dial`]; plain tonic
//! clients work as long as they are not sent fds.

mod channel;
mod conn;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::{Stream, StreamExt, wrappers::UnixListenerStream};
use tonic::transport::{Channel, Endpoint, Uri};

pub use channel::{DEFAULT_MAX_HELD_FDS, FdChannel, FdStats, inode_url_of};
pub use conn::{FdStream, MAX_FDS_PER_WRITE};

use crate::inode::InodeUrl;

/// Why an fd could not be sent or received (carried inside the `io::Error`s of this module).
#[derive(Debug, thiserror::Error)]
pub enum GrpcfdError {
    #[error("no fd for {url} arrived on this connection within {timeout:?}")]
    Timeout { url: InodeUrl, timeout: Duration },
    #[error("the connection ended before an fd for {0} arrived")]
    ClosedBeforeArrival(InodeUrl),
    #[error("cannot queue an fd: the connection has ended")]
    Closed,
    #[error(
        "the server closed the unix connection to {0} before the call completed (one connection per call: not redialled)"
    )]
    Redial(PathBuf),
}

impl From<GrpcfdError> for io::Error {
    fn from(e: GrpcfdError) -> Self {
        let kind = match e {
            GrpcfdError::Timeout { .. } => io::ErrorKind::TimedOut,
            GrpcfdError::ClosedBeforeArrival(_) => io::ErrorKind::ConnectionAborted,
            GrpcfdError::Closed | GrpcfdError::Redial(_) => io::ErrorKind::NotConnected,
        };
        io::Error::new(kind, e)
    }
}

/// Server side: for `tonic::transport::Server::builder()...serve_with_incoming(grpcfd::incoming(listener))`; each connection's
/// FdChannel is in the request extensions: `request.extensions().get::<FdChannel>()`.
pub fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<FdStream>> {
    UnixListenerStream::new(listener).map(|conn| conn.map(FdStream::new))
}

/// [`incoming`] with at most `max` connections open at once: a connection
/// beyond that is closed as soon as it is accepted (and logged, sparingly),
/// so a flood of idle connections cannot take the server's fds and memory.
pub fn incoming_limited(
    listener: UnixListener,
    max: usize,
) -> impl Stream<Item = io::Result<FdStream>> {
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    UnixListenerStream::new(listener).filter_map(move |conn| match conn {
        Err(e) => Some(Err(e)),
        Ok(io) => match slots.clone().try_acquire_owned() {
            Ok(slot) => Some(Ok(FdStream::new(io).holding(slot))),
            Err(_) => {
                let n = refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        open = max,
                        refused = n,
                        "connection refused: the most this server keeps open are open"
                    );
                }
                None
            }
        },
    })
}

/// The authority tonic puts in requests; unix sockets ignore it.
const UDS_ENDPOINT: &str = "http://[::]:50051";

/// Client side: a tonic Channel over ONE fresh unix connection (NSM forwarders dial a fresh connection per Request), and its FdChannel.
pub async fn dial(path: impl AsRef<Path>) -> Result<(Channel, FdChannel), tonic::transport::Error> {
    dial_endpoint(Endpoint::from_static(UDS_ENDPOINT), path).await
}

/// [`dial`] failing after `timeout` if the socket does not accept.
pub async fn dial_with_timeout(
    path: impl AsRef<Path>,
    timeout: Duration,
) -> Result<(Channel, FdChannel), tonic::transport::Error> {
    dial_endpoint(
        Endpoint::from_static(UDS_ENDPOINT).connect_timeout(timeout),
        path,
    )
    .await
}

/// [`dial`] with the caller's endpoint settings (timeouts, HTTP/2 options); its URI is ignored.
///
/// The channel never reconnects: fds belong to one connection, so once it
/// ends every call fails (`NotConnected`) and the caller dials again.
pub async fn dial_endpoint(
    endpoint: Endpoint,
    path: impl AsRef<Path>,
) -> Result<(Channel, FdChannel), tonic::transport::Error> {
    let path = path.as_ref().to_path_buf();
    let fds = FdChannel::new();
    // Handed to the first (eager) connect only; the slot then stays empty.
    let slot = Arc::new(Mutex::new(Some(fds.clone())));
    let connector = tower::service_fn(move |_: Uri| {
        let (slot, path) = (slot.clone(), path.clone());
        async move {
            let taken = slot
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            let fds = taken.ok_or_else(|| io::Error::from(GrpcfdError::Redial(path.clone())))?;
            let io = UnixStream::connect(&path).await?;
            Ok::<_, io::Error>(TokioIo::new(FdStream::with_channel(io, fds)))
        }
    });
    let channel = endpoint.connect_with_connector(connector).await?;
    Ok((channel, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Beyond `max` open connections a new one is closed at once; once one
    /// of the open ones ends, a new one is kept again.
    #[tokio::test]
    async fn incoming_limited_closes_connections_beyond_its_bound() {
        let dir = std::env::temp_dir().join(format!("grpcfd-limit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let mut incoming = Box::pin(incoming_limited(UnixListener::bind(&path).unwrap(), 1));
        let _a = UnixStream::connect(&path).await.unwrap();
        let held = incoming.next().await.unwrap().unwrap();
        // The server keeps accepting in the background; B finds it full.
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            while let Some(conn) = incoming.next().await {
                if tx.send(conn.unwrap()).await.is_err() {
                    break;
                }
            }
        });
        let mut b = UnixStream::connect(&path).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), b.read(&mut buf))
            .await
            .expect("B is closed at once")
            .unwrap();
        assert_eq!(n, 0, "B: end of stream");
        drop(held);
        let _c = UnixStream::connect(&path).await.unwrap();
        let kept = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("C is accepted once A's slot is free");
        assert!(kept.is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
