//! TLS under gRPC and above the fd side channel, as NSM's grpcfd wraps the
//! raw unix connection below TLS: the fds ride on the socket's bytes
//! whatever those bytes are, so fd passing works the same with TLS.
//!
//! Server side, handshakes run concurrently (a slow or silent client never
//! holds up the others) and are bounded by [`HANDSHAKE_TIMEOUT`]; each
//! connection then carries its [`Peer`]: its fd channel and the SPIFFE ID
//! its certificate proved.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};

use crate::grpcfd::{FdChannel, FdStream};
use crate::tls::{PeerSvid, peer_svid};

/// The longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who called, as far as the transport knows: the fd channel of its unix
/// connection, and under TLS its verified SVID.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub fds: Option<FdChannel>,
    pub svid: Option<PeerSvid>,
}

impl Peer {
    /// The caller of a request: from its TLS connection, else its plain
    /// unix connection's fd channel.
    pub fn of(ext: &tonic::Extensions) -> Peer {
        if let Some(p) = ext.get::<Peer>() {
            return p.clone();
        }
        Peer {
            fds: ext.get::<FdChannel>().cloned(),
            ..Default::default()
        }
    }
}

/// A stream with an fd channel (unix) or without (TCP).
pub trait RawStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn fds(&self) -> Option<FdChannel>;
}

impl RawStream for FdStream {
    fn fds(&self) -> Option<FdChannel> {
        Some(self.channel().clone())
    }
}

impl RawStream for TcpStream {
    fn fds(&self) -> Option<FdChannel> {
        None
    }
}

/// A server connection after the TLS handshake.
pub struct SecureStream<IO> {
    tls: tokio_rustls::server::TlsStream<IO>,
    peer: Peer,
}

impl<IO: RawStream> SecureStream<IO> {
    async fn accept(io: IO, acceptor: TlsAcceptor) -> io::Result<SecureStream<IO>> {
        let fds = io.fds();
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let peer = Peer {
            fds,
            svid: peer_svid(tls.get_ref().1),
        };
        Ok(SecureStream { tls, peer })
    }
}

impl<IO: RawStream> AsyncRead for SecureStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_read(cx, buf)
    }
}

impl<IO: RawStream> AsyncWrite for SecureStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

impl<IO: RawStream> tonic::transport::server::Connected for SecureStream<IO> {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

/// `incoming` with a TLS handshake on every connection, run concurrently;
/// connections whose handshake fails are closed (logged at debug).
pub fn secure_incoming<IO: RawStream>(
    incoming: impl Stream<Item = io::Result<IO>> + Send + 'static,
    config: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = io::Result<SecureStream<IO>>> {
    let acceptor = TlsAcceptor::from(config);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut incoming = Box::pin(incoming);
        while let Some(conn) = incoming.next().await {
            let io = match conn {
                Ok(io) => io,
                Err(e) => {
                    if tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                match SecureStream::accept(io, acceptor).await {
                    Ok(s) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "TLS handshake failed: connection closed")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The name our clients present: NSM's Go clients send `localhost` over
/// unix sockets too, and it names no one (peers are told by SPIFFE ID).
fn server_name() -> ServerName<'static> {
    ServerName::try_from("localhost").expect("a valid DNS name")
}

/// A client connection after the TLS handshake, and the server's SVID.
pub type ClientTls<IO> = (
    TokioIo<tokio_rustls::client::TlsStream<IO>>,
    Option<PeerSvid>,
);

/// A TLS client connection over a fresh unix connection whose fd channel is
/// `fds`.
pub async fn connect_unix(
    path: &Path,
    fds: FdChannel,
    config: Arc<rustls::ClientConfig>,
) -> io::Result<ClientTls<FdStream>> {
    let io = FdStream::with_channel(UnixStream::connect(path).await?, fds);
    let tls = TlsConnector::from(config)
        .connect(server_name(), io)
        .await?;
    let svid = peer_svid(tls.get_ref().1);
    Ok((TokioIo::new(tls), svid))
}

/// A TLS client connection over TCP.
pub async fn connect_tcp(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
) -> io::Result<ClientTls<TcpStream>> {
    let io = TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(config)
        .connect(server_name(), io)
        .await?;
    let svid = peer_svid(tls.get_ref().1);
    Ok((TokioIo::new(tls), svid))
}
