//! The endpoint on gRPC: `networkservice.NetworkService`,
//! `connection.MonitorConnection` and `grpc.health.v1.Health` on one socket,
//! unix (with grpcfd, so our netns fd reaches the forwarder) or TCP.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use nsm_api::chain::Ctx;
use nsm_api::connection::Connection;
use nsm_api::connection::monitor_connection_server::MonitorConnectionServer;
use nsm_api::grpcfd;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::networkservice::network_service_server::{NetworkService, NetworkServiceServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use crate::chain::functions::NetworkFunction;
use crate::config::{Config, ListenOn};
use crate::endpoint::{Endpoint, EndpointError, EndpointOptions};
use crate::error::NseError;
use crate::mesh_proxy::MeshProxy;
use crate::validate;

/// Largest request message accepted (gRPC's usual 4 MiB); larger ones get OUT_OF_RANGE.
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// How long a graceful shutdown may wait for in-flight calls.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("mesh-proxy function: {0}")]
    MeshProxy(#[source] forwarder_plugin::netns::NetnsError),
    #[error(transparent)]
    Listen(#[from] nsm_api::listen::ListenError),
    #[error("cannot listen on {0}: {1}")]
    Bind(String, #[source] std::io::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("server task failed: {0}")]
    Task(String),
}

/// `networkservice.NetworkService` over the endpoint.
pub struct NetworkServiceHandler {
    endpoint: Arc<Endpoint>,
    /// At most `limits::MAX_CONCURRENT_CALLS` calls at once.
    admission: nsm_api::limits::Admission,
}

impl NetworkServiceHandler {
    pub fn new(endpoint: Arc<Endpoint>) -> Self {
        NetworkServiceHandler {
            endpoint,
            admission: nsm_api::limits::Admission::default(),
        }
    }
}

/// `id` is the caller's: escaped and cut ([`nsm_api::limits::loggable`]).
fn log_outcome<T>(what: &str, id: &str, res: &Result<T, NseError>) {
    let id = nsm_api::limits::loggable(id);
    match res {
        Ok(_) => tracing::debug!(%id, "{what} done"),
        Err(e) => tracing::info!(%id, code = ?e.code(), error = %e, "{what} refused"),
    }
}

#[tonic::async_trait]
impl NetworkService for NetworkServiceHandler {
    async fn request(
        &self,
        request: Request<NetworkServiceRequest>,
    ) -> Result<Response<Connection>, Status> {
        let id = request
            .get_ref()
            .connection
            .as_ref()
            .map(|c| c.id.clone())
            .unwrap_or_default();
        let _slot = self.admission.enter("Request")?;
        let res = async {
            let ctx = Ctx::from_request(&request)?;
            let req = validate::request(request.into_inner())?;
            self.endpoint.request(ctx, req).await
        }
        .await;
        log_outcome("Request", &id, &res);
        Ok(Response::new(res?))
    }

    async fn close(&self, request: Request<Connection>) -> Result<Response<()>, Status> {
        let id = request.get_ref().id.clone();
        let _slot = self.admission.enter("Close")?;
        let res = async {
            let ctx = Ctx::from_request(&request)?;
            let conn = request.into_inner();
            validate::connection(&conn)?;
            self.endpoint.close(ctx, conn).await
        }
        .await;
        log_outcome("Close", &id, &res);
        res?;
        Ok(Response::new(()))
    }
}

/// Serves `endpoint` on `listen_on` until `shutdown` completes, then drains
/// (monitor streams end, in-flight calls get [`SHUTDOWN_GRACE`]) and removes the socket.
pub async fn serve(
    listen_on: &ListenOn,
    socket_group: Option<u32>,
    endpoint: Arc<Endpoint>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in nsm_api::HEALTH_SERVICE_NAMES {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    health.set_service_status("", ServingStatus::Serving).await;

    let hub = endpoint.monitor().clone();
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(
            NetworkServiceServer::new(NetworkServiceHandler::new(endpoint.clone()))
                .max_decoding_message_size(MAX_MESSAGE_SIZE),
        )
        .add_service(
            MonitorConnectionServer::new(hub.clone()).max_decoding_message_size(MAX_MESSAGE_SIZE),
        );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stopped = async move {
        let _ = stop_rx.await;
    };
    // Removes the socket file when `serve` returns, however it returns.
    let mut socket_file = None;
    let mut server = match listen_on {
        ListenOn::Unix(path) => {
            let (listener, file) = nsm_api::listen::bind_unix(path, socket_group)?;
            socket_file = Some(file);
            tokio::spawn(router.serve_with_incoming_shutdown(
                grpcfd::incoming_limited(listener, nsm_api::limits::MAX_CONNECTIONS),
                stopped,
            ))
        }
        ListenOn::Tcp(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| ServeError::Bind(listen_on.to_string(), e))?;
            let incoming = TcpListenerStream::new(listener);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
        }
    };
    tracing::info!(%listen_on, "serving networkservice.NetworkService, connection.MonitorConnection, grpc.health.v1.Health");

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
    for name in nsm_api::HEALTH_SERVICE_NAMES {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    hub.shutdown();
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

/// The whole program after configuration: endpoint, server, signals.
pub async fn run(config: Config) -> Result<(), ServeError> {
    let function = config.function.clone();
    tracing::info!(
        placement = %function.placement,
        proxy_port = %function.proxy.port,
        proxy_mode = ?function.proxy.mode,
        capture_method = %function.capture.method,
        capture_cidrs = ?function.capture.cidrs,
        capture_excluded = function.capture.exclude_cidrs.len(),
        capture_dns = function.capture.dns,
        backend = %function.rules.backend,
        table = %function.rules.owner,
        "mesh-proxy function"
    );
    let mesh_proxy = Arc::new(MeshProxy::start(function).map_err(ServeError::MeshProxy)?);
    let functions: Vec<Arc<dyn NetworkFunction>> = vec![mesh_proxy.clone()];
    let endpoint = Arc::new(Endpoint::with_functions(
        &EndpointOptions::from(&config),
        functions,
    )?);
    tracing::info!(
        name = %config.name,
        services = ?config.service_names,
        labels = ?config.labels,
        cidr_prefix = ?config.cidr_groups,
        ipam_policy = %config.ipam_policy,
        max_token_lifetime = ?config.max_token_lifetime,
        payload = %config.payload,
        connect_to = ?config.connect_to,
        netns = %endpoint.netns_url(),
        "starting (insecure: no TLS, tokens signed with an ephemeral key)"
    );
    if config.connect_to.is_some() {
        tracing::warn!(
            "NSM_CONNECT_TO is set, but registration is not implemented yet: not registering"
        );
    }
    let shutdown = nsm_api::listen::termination()?;
    let served = serve(&config.listen_on, config.socket_group, endpoint, shutdown).await;
    let release = tokio::task::spawn_blocking(move || mesh_proxy.release());
    if let Err(e) = release.await {
        tracing::warn!(error = %e, "releasing the mesh-proxy rules failed");
    }
    served
}
