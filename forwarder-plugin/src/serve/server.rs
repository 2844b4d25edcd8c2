//! The hop on gRPC: `networkservice.NetworkService`,
//! `connection.MonitorConnection` and `grpc.health.v1.Health` on one unix
//! socket with grpcfd (the client's netns fd arrives on it), until SIGTERM.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nsm_api::chain::authorize::Authorize;
use nsm_api::chain::begin::Begin;
use nsm_api::chain::monitor::Monitor;
use nsm_api::chain::timeout::Timeout;
use nsm_api::chain::updatepath::UpdatePath;
use nsm_api::chain::updatetoken::UpdateToken;
use nsm_api::chain::{Ctx, Element, Next, Req};
use nsm_api::connection::Connection;
use nsm_api::metrics::CallMetrics;
use nsm_api::monitor::MonitorHub;
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::networkservice::network_service_server::NetworkService;
use nsm_api::tls::{Identity, TlsError};
use nsm_api::token::TokenIssuer;
use tonic::{Request, Response, Status};

use super::config::ServeConfig;
use super::downstream::NextHop;
use super::elements::{Adopt, Forward, Rejoin};
use super::error::ForwardError;
use super::forward::Forwarder;
use super::route::Router;
use crate::hop::{Hop, HopError, HopOptions};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Hop(#[from] HopError),
    #[error("cannot make a token key: {0}")]
    Token(String),
    #[error(transparent)]
    Serve(#[from] nsm_api::transport::ServeError),
    #[error(transparent)]
    Listen(#[from] nsm_api::listen::ListenError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The forwarder chain and what the server and shutdown need of it.
pub struct ForwarderHop {
    head: Next<ForwardError>,
    forwarder: Arc<Forwarder>,
    monitor: MonitorHub,
    metrics: Arc<CallMetrics>,
}

impl ForwarderHop {
    pub fn new(
        cfg: &ServeConfig,
        identity: Option<Arc<Identity>>,
    ) -> Result<ForwarderHop, ServeError> {
        let hop = Arc::new(Hop::open(&HopOptions {
            state_dir: cfg.state_dir.clone(),
            backend: cfg.backend,
            proxies: cfg.proxies.clone(),
        })?);
        let issuer = Arc::new(
            TokenIssuer::for_identity(identity.as_ref(), &cfg.name, cfg.max_token_lifetime)
                .map_err(|e| ServeError::Token(e.to_string()))?,
        );
        let next_hop = NextHop::new(
            &cfg.next_hop,
            cfg.dial_timeout,
            identity.clone(),
            issuer.clone(),
        )?;
        let router = Router::new(next_hop);
        let monitor = MonitorHub::new();
        let forwarder = Arc::new(Forwarder::new(
            hop,
            router,
            monitor.clone(),
            issuer.clone(),
            cfg.dial_timeout,
            cfg.request_timeout,
        ));
        let elements: Vec<Arc<dyn Element<ForwardError>>> = vec![
            Arc::new(Rejoin::new(cfg.name.clone(), forwarder.clone())),
            Arc::new(UpdatePath::new(cfg.name.clone())),
            Arc::new(Authorize::new(cfg.server_policies, identity.clone())),
            Arc::new(Adopt::new(forwarder.clone())),
            Arc::new(Begin::new()),
            Arc::new(UpdateToken::new(issuer)),
            Arc::new(Timeout::new()),
            Arc::new(Monitor::new(monitor.clone())),
            Arc::new(Forward::new(forwarder.clone(), cfg.request_timeout)),
        ];
        Ok(ForwarderHop {
            head: Next::chain(elements),
            metrics: forwarder.metrics().clone(),
            forwarder,
            monitor,
        })
    }

    pub fn hop(&self) -> &Arc<Hop> {
        self.forwarder.hop()
    }

    /// Runs a Request through the chain in its own task, so a caller that
    /// goes away cannot cut plumbing half-way: it completes or rolls back.
    pub async fn request(
        &self,
        ctx: Ctx<ForwardError>,
        req: Req,
    ) -> Result<Connection, ForwardError> {
        let started = std::time::Instant::now();
        let head = self.head.clone();
        let res = tokio::spawn(async move {
            let mut ctx = ctx;
            head.request(&mut ctx, req).await
        })
        .await
        .map_err(|e| ForwardError::Internal(format!("request task failed: {e}")))
        .and_then(|r| r);
        self.observe("Request", res.as_ref().err(), started);
        res
    }

    fn observe(
        &self,
        method: &'static str,
        err: Option<&ForwardError>,
        started: std::time::Instant,
    ) {
        let code = err.map_or(tonic::Code::Ok, ForwardError::code);
        self.metrics
            .observe(method, code, started.elapsed(), self.hop().len());
    }

    pub async fn close(
        &self,
        ctx: Ctx<ForwardError>,
        conn: Connection,
    ) -> Result<(), ForwardError> {
        let started = std::time::Instant::now();
        let head = self.head.clone();
        let res = tokio::spawn(async move {
            let mut ctx = ctx;
            head.close(&mut ctx, conn).await
        })
        .await
        .map_err(|e| ForwardError::Internal(format!("close task failed: {e}")))
        .and_then(|r| r);
        self.observe("Close", res.as_ref().err(), started);
        res
    }

    /// Connections a previous run plumbed and nobody refreshed since are
    /// closed when their caller's token expires, as the timeout element
    /// would have done.
    pub async fn arm_adopted_expiry(self: &Arc<Self>) {
        for (id, rec) in self.hop().adopted() {
            if rec.session.closing {
                // A Close before the restart could not undo it all: again now.
                tracing::info!(%id, client_if = %rec.plan.a.name, "finishing the Close of a connection the last run could not undo");
                match self.forwarder.close_own(&id).await {
                    Ok(()) => tracing::info!(%id, "undone"),
                    Err(e) => {
                        tracing::warn!(%id, error = %e, "still cannot undo it; the next start tries again")
                    }
                }
                continue;
            }
            let Some(at) = rec.session.expires_unix else {
                continue;
            };
            let delay = (UNIX_EPOCH + Duration::from_secs(at))
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tracing::info!(%id, client_if = %rec.plan.a.name, ?delay, "adopted a connection plumbed before the restart");
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if this.hop().is_adopted(&id) {
                    tracing::info!(%id, "adopted connection expired without refresh: closing it");
                    if let Err(e) = this.forwarder.close_own(&id).await {
                        tracing::warn!(%id, error = %e, "closing the expired adopted connection failed");
                    }
                }
            });
        }
    }

    /// Undoes every connection and closes it downstream (`--cleanup-on-exit`).
    pub async fn cleanup_all(&self) {
        for id in self.hop().records().into_keys() {
            match self.forwarder.close_own(&id).await {
                Ok(()) => tracing::info!(%id, "cleaned up on exit"),
                Err(e) => tracing::warn!(%id, error = %e, "cleanup on exit failed"),
            }
        }
    }
}

/// `networkservice.NetworkService` over the forwarder chain.
pub struct Handler {
    hop: Arc<ForwarderHop>,
    /// At most `limits::MAX_CONCURRENT_CALLS` calls at once.
    admission: nsm_api::limits::Admission,
}

/// `id` is the caller's: escaped and cut ([`nsm_api::limits::loggable`]).
fn log_outcome<T>(what: &str, id: &str, res: &Result<T, ForwardError>) {
    let id = nsm_api::limits::loggable(id);
    match res {
        Ok(_) => tracing::debug!(%id, "{what} done"),
        Err(e) => tracing::info!(%id, code = ?e.code(), error = %e, "{what} refused"),
    }
}

#[tonic::async_trait]
impl NetworkService for Handler {
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
            let msg = request.into_inner();
            nsm_api::limits::check_request(&msg)
                .map_err(|e| ForwardError::Invalid(e.to_string()))?;
            let conn = msg
                .connection
                .ok_or_else(|| ForwardError::Invalid("the request has no connection".into()))?;
            let req = Req {
                conn,
                preferences: msg.mechanism_preferences,
            };
            self.hop.request(ctx, req).await
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
            nsm_api::limits::check_connection(&conn)
                .map_err(|e| ForwardError::Invalid(e.to_string()))?;
            self.hop.close(ctx, conn).await
        }
        .await;
        log_outcome("Close", &id, &res);
        res?;
        Ok(Response::new(()))
    }
}

/// Serves until `shutdown` completes; then stops accepting, drains, and
/// (with `--cleanup-on-exit`) undoes every connection.
pub async fn serve(
    cfg: &ServeConfig,
    identity: Option<Arc<Identity>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let hop = Arc::new(ForwarderHop::new(cfg, identity.clone())?);
    hop.arm_adopted_expiry().await;
    {
        let hop = hop.forwarder.hop().clone();
        tokio::spawn(async move {
            for (id, e) in hop.start_adopted_proxies().await {
                tracing::error!(%id, error = %e, "cannot start the adopted connection's client proxy again; its traffic waits (refused) until a refresh starts it");
            }
        });
    }
    let metrics = cfg.metrics_listen_on.map(|addr| {
        let m = hop.metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = nsm_api::metrics::serve(addr, m).await {
                tracing::error!(%addr, error = %e, "cannot serve metrics");
            }
        })
    });
    let proxies_file = match (&cfg.proxies_file, &cfg.proxies) {
        (Some(path), Some(defs)) => Some(tokio::spawn(super::proxies::watch(
            hop.forwarder.hop().clone(),
            path.clone(),
            defs.clone(),
        ))),
        _ => None,
    };
    let dead_clients = tokio::spawn(super::dead_clients::watch(
        hop.forwarder.clone(),
        hop.monitor.clone(),
    ));

    let listen = nsm_api::transport::Listen::Unix {
        path: cfg.listen_on.clone(),
        group: cfg.socket_group,
    };
    let handler = Handler {
        hop: hop.clone(),
        admission: nsm_api::limits::Admission::default(),
    };
    tracing::info!(next_hop = %cfg.next_hop_url(), "forwarding");
    let tokens = Arc::new(
        TokenIssuer::for_identity(identity.as_ref(), &cfg.name, cfg.max_token_lifetime)
            .map_err(|e| ServeError::Token(e.to_string()))?,
    );
    let registration =
        super::register::registrar(cfg, identity.as_ref(), tokens, hop.metrics.clone())?.start();
    // On SIGTERM: unregister (if asked to) while still serving, then stop.
    let shutdown = async move {
        shutdown.await;
        registration.stop().await;
    };
    nsm_api::transport::serve(&listen, identity, handler, hop.monitor.clone(), shutdown).await?;
    dead_clients.abort();
    if let Some(t) = proxies_file {
        t.abort();
    }
    if let Some(m) = metrics {
        m.abort();
    }
    if cfg.cleanup_on_exit {
        hop.cleanup_all().await;
    } else {
        let left = hop.hop().len();
        tracing::info!(connections = left, state = %hop.hop().state_path().display(), "leaving the dataplane for the next start to adopt");
    }
    Ok(())
}

/// The whole subcommand after configuration: chain, server, signals.
pub async fn run(cfg: ServeConfig) -> Result<(), ServeError> {
    tracing::info!(
        name = %cfg.name,
        listen_on = %cfg.listen_on_url(),
        next_hop = %cfg.next_hop_url(),
        dial_timeout = ?cfg.dial_timeout,
        request_timeout = ?cfg.request_timeout,
        max_token_lifetime = ?cfg.max_token_lifetime,
        backend = %cfg.backend,
        state_dir = %cfg.state_dir.display(),
        cleanup_on_exit = cfg.cleanup_on_exit,
        identity = %cfg.identity,
        "starting"
    );
    let identity = cfg.identity.open(nsm_api::tls::IDENTITY_WAIT).await?;
    let shutdown = nsm_api::listen::termination()?;
    serve(&cfg, identity, shutdown).await
}
