//! The endpoint on gRPC: `networkservice.NetworkService`,
//! `connection.MonitorConnection` and `grpc.health.v1.Health` on one socket,
//! unix (with grpcfd, so our netns fd reaches the forwarder) or TCP.

use std::future::Future;
use std::sync::Arc;

use nsm_api::tls::Identity;

use nsm_api::chain::Ctx;
use nsm_api::connection::Connection;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::networkservice::network_service_server::NetworkService;
use nsm_api::transport::Listen;
use tonic::{Request, Response, Status};

use crate::config::{Config, ListenOn};
use crate::endpoint::{Endpoint, EndpointError, EndpointOptions};
use crate::error::NseError;
use crate::validate;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error(transparent)]
    Functions(#[from] crate::functions::StartError),
    #[error(transparent)]
    Listen(#[from] nsm_api::listen::ListenError),
    #[error(transparent)]
    Serve(#[from] nsm_api::transport::ServeError),
    #[error(transparent)]
    Tls(#[from] nsm_api::tls::TlsError),
    #[error("NSM_CONNECT_TO {0}")]
    Register(String),
    #[error(transparent)]
    Token(#[from] nsm_api::token::TokenError),
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

/// Serves `endpoint` on `listen_on` until `shutdown` completes, then stops
/// gracefully (`nsm_api::transport::serve`).
pub async fn serve(
    listen_on: &ListenOn,
    socket_group: Option<u32>,
    tls: Option<Arc<Identity>>,
    endpoint: Arc<Endpoint>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listen = match listen_on {
        ListenOn::Unix(path) => Listen::Unix {
            path: path.clone(),
            group: socket_group,
        },
        ListenOn::Tcp(addr) => Listen::Tcp(*addr),
    };
    let monitor = endpoint.monitor().clone();
    nsm_api::transport::serve(
        &listen,
        tls,
        NetworkServiceHandler::new(endpoint),
        monitor,
        shutdown,
    )
    .await?;
    Ok(())
}

/// The whole program after configuration: endpoint, server, signals.
pub async fn run(config: Config) -> Result<(), ServeError> {
    let identity = config.identity.open(nsm_api::tls::IDENTITY_WAIT).await?;
    let started = crate::functions::start(&config.functions, config.state_dir.as_deref()).await?;
    tracing::info!(
        functions = ?started.instances.iter().map(|f| f.name()).collect::<Vec<_>>(),
        chains = ?config.functions.chains,
        default_chain = %config.functions.default_chain,
        policy = ?config.functions.network_service_file,
        "network functions"
    );
    let options = EndpointOptions {
        identity: identity.clone(),
        ..EndpointOptions::from(&config)
    };
    let endpoint = Arc::new(Endpoint::with_chains(&options, started.chains.clone())?);
    let metrics = config.metrics_listen_on.map(|addr| {
        let m = endpoint.metrics().clone();
        tokio::spawn(async move {
            if let Err(e) = nsm_api::metrics::serve(addr, m).await {
                tracing::error!(%addr, error = %e, "cannot serve metrics");
            }
        })
    });
    for f in &started.instances {
        for (id, src, dst) in f.adopted() {
            if let Err(e) = endpoint.reserve(&id, src, dst) {
                tracing::warn!(%id, error = %e, "cannot give an adopted connection its addresses back");
            }
        }
    }
    // Every second: tables are put back if they drifted (fail closed), and
    // adopted connections never heard of again leave once their interface
    // is gone (their client went while we were away).
    // NSM_CONFIG read again: a changed proxy definition is upgraded to.
    let reload = config.config_file.clone().map(|f| {
        Arc::new(crate::functions::reload::Reload::new(
            f,
            config.functions.clone(),
            started.meshes.iter().map(|(n, _)| n.clone()).collect(),
        ))
    });
    let maintenance = {
        let (instances, ep) = (started.instances.clone(), endpoint.clone());
        let meshes = started.meshes.clone();
        let chains = started.chains.clone();
        tokio::spawn(async move {
            let mut memory = nsm_api::memory::Trim::default();
            loop {
                tokio::time::sleep(crate::functions::MAINTENANCE_PERIOD).await;
                if memory.after(ep.stats().connections) {
                    tracing::debug!("connections gone: freed memory returned to the kernel");
                }
                let c = chains.clone();
                let _ = tokio::task::spawn_blocking(move || c.reload_if_changed()).await;
                if let Some(r) = reload.clone()
                    && let Ok(upgrades) = tokio::task::spawn_blocking(move || r.changed()).await
                {
                    for (name, def) in upgrades {
                        let Some((_, mesh)) = meshes.iter().find(|(n, _)| *n == name) else {
                            continue;
                        };
                        // Up to the proxy's start timeout; upkeep goes on.
                        let mesh = mesh.clone();
                        tokio::spawn(async move { mesh.reload_process(def).await });
                    }
                }
                for f in &instances {
                    for id in f.maintain().await {
                        tracing::info!(%id, function = f.name(), "an adopted connection's interface is gone: forgotten");
                        ep.forget(&id);
                    }
                }
            }
        })
    };
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
        identity = %config.identity,
        "starting"
    );
    let registration = match &config.connect_to {
        Some(url) => Some(
            crate::register::registrar(
                &config,
                url,
                identity.as_ref(),
                endpoint.metrics().clone(),
            )?
            .start(),
        ),
        None => None,
    };
    let term = nsm_api::listen::termination()?;
    // On SIGTERM: unregister (if asked to) while still serving, then stop.
    let shutdown = async move {
        term.await;
        if let Some(r) = registration {
            r.stop().await;
        }
    };
    let served = serve(
        &config.listen_on,
        config.socket_group,
        identity,
        endpoint,
        shutdown,
    )
    .await;
    maintenance.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    let instances = started.instances;
    let release = tokio::task::spawn_blocking(move || {
        for f in instances.iter().rev() {
            f.release();
        }
    });
    if let Err(e) = release.await {
        tracing::warn!(error = %e, "releasing the functions' rules failed");
    }
    served
}
