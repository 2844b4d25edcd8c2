//! The one gRPC server every NSM hop of this workspace runs:
//! `networkservice.NetworkService`, `connection.MonitorConnection` and
//! `grpc.health.v1.Health` on one socket — unix with grpcfd (fds beside the
//! messages), or TCP — with the limits of [`crate::limits`], and a graceful
//! stop: health goes NOT_SERVING, monitor streams end, in-flight calls get
//! [`SHUTDOWN_GRACE`], the socket file is removed.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;

use super::secure::secure_incoming;
use crate::connection::monitor_connection_server::MonitorConnectionServer;
use crate::monitor::MonitorHub;
use crate::networkservice::network_service_server::{NetworkService, NetworkServiceServer};
use crate::tls::{Identity, TlsError};
use crate::{grpcfd, limits, listen};

/// Largest request message accepted (gRPC's usual 4 MiB); larger ones get OUT_OF_RANGE.
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// How long a graceful stop waits for in-flight calls.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket: fds travel beside the messages (grpcfd).
    Unix {
        path: PathBuf,
        /// The socket's group ([`listen::bind_unix`]).
        group: Option<u32>,
    },
    /// TCP: no fds.
    Tcp(SocketAddr),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix { path, .. } => write!(f, "unix://{}", path.display()),
            Listen::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Listen(#[from] listen::ListenError),
    #[error("cannot listen on {0}: {1}")]
    Bind(String, #[source] std::io::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("server task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// With telemetry on, a span per call (probes' health checks excepted),
/// child of the caller's traceparent.
fn call_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let path = req.uri().path();
    if !crate::telemetry::enabled() || path.starts_with("/grpc.health.") {
        return tracing::Span::none();
    }
    crate::telemetry::server_span(path, req.headers())
}

/// Serves `service` and `monitor` on `listen` until `shutdown` completes,
/// then stops gracefully (see the module doc). With `tls`, every connection
/// is mTLS with SPIFFE SVIDs (fds still travel beneath TLS on unix).
pub async fn serve<S: NetworkService>(
    listen: &Listen,
    tls: Option<Arc<Identity>>,
    service: S,
    monitor: MonitorHub,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in crate::HEALTH_SERVICE_NAMES.into_iter().chain([""]) {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    let router = tonic::transport::Server::builder()
        .trace_fn(call_span)
        .add_service(health_service)
        .add_service(NetworkServiceServer::new(service).max_decoding_message_size(MAX_MESSAGE_SIZE))
        .add_service(
            MonitorConnectionServer::new(monitor.clone())
                .max_decoding_message_size(MAX_MESSAGE_SIZE),
        );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stopped = async move {
        let _ = stop_rx.await;
    };
    // Removes the socket file when `serve` returns, however it returns.
    let mut socket_file = None;
    let tls = tls.map(|i| i.server_config()).transpose()?;
    let mut server = match listen {
        Listen::Unix { path, group } => {
            let (listener, file) = listen::bind_unix(path, *group)?;
            socket_file = Some(file);
            let incoming = grpcfd::incoming_limited(listener, limits::MAX_CONNECTIONS);
            match tls {
                Some(cfg) => tokio::spawn(
                    router.serve_with_incoming_shutdown(secure_incoming(incoming, cfg), stopped),
                ),
                None => tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped)),
            }
        }
        Listen::Tcp(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| ServeError::Bind(listen.to_string(), e))?;
            let incoming = TcpListenerStream::new(listener);
            match tls {
                Some(cfg) => tokio::spawn(
                    router.serve_with_incoming_shutdown(secure_incoming(incoming, cfg), stopped),
                ),
                None => tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped)),
            }
        }
    };
    tracing::info!(listen_on = %listen, "serving networkservice.NetworkService, connection.MonitorConnection, grpc.health.v1.Health");

    tokio::select! {
        res = &mut server => {
            return match res {
                Ok(r) => r.map_err(ServeError::from),
                Err(e) => Err(ServeError::Task(e.to_string())),
            };
        }
        () = shutdown => {}
    }
    tracing::info!("shutting down");
    for name in crate::HEALTH_SERVICE_NAMES {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    monitor.shutdown();
    let _ = stop_tx.send(());
    match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
        Ok(Ok(res)) => res?,
        Ok(Err(e)) => tracing::warn!(error = %e, "server task failed during shutdown"),
        Err(_) => {
            tracing::warn!(
                "in-flight calls did not finish within {SHUTDOWN_GRACE:?}; stopping anyway"
            );
            server.abort();
        }
    }
    drop(socket_file);
    Ok(())
}
