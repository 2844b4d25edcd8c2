//! Registration with NSM's registry, as sdk's registry client chain does it
//! for an endpoint or a forwarder: the network services first (unless told
//! not to: registry-k8s overwrites a NetworkService's `matches`), then the
//! endpoint itself — its `unix://` URL rewritten to `inode://dev/ino` of its
//! socket file, whose fd (`O_PATH`) travels beside the call so nsmgr can
//! dial it through `/proc/<pid>/fd/<n>` — with the registry `path` metadata
//! and our per-RPC token. It re-registers at 2/3 of the expiration the
//! registry returns, retries with backoff and jitter while the registry is
//! away, and unregisters at exit when asked to.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;

use crate::grpcfd::inode_url_of;
use crate::metadata;
use crate::path::{from_timestamp, to_timestamp};
use crate::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
use crate::registry::network_service_registry_client::NetworkServiceRegistryClient;
use crate::registry::{NetworkService, NetworkServiceEndpoint};
use crate::token::TokenIssuer;
use crate::transport::{CallError, Dialer, Session};

/// gRPC metadata key of the registry's private path (sdk `grpcmetadata`).
pub const PATH_METADATA: &str = "path";
/// Longest a registry call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Retries start here and double up to [`MAX_BACKOFF`], ±20 % jitter.
pub const MIN_BACKOFF: Duration = Duration::from_millis(200);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Refresh period when the registry returns no expiration.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(40);
/// Never refresh more often than this, whatever the registry says.
pub const MIN_REFRESH: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("registry {0}")]
    Call(#[from] CallError),
    #[error("registry {target}: {status}")]
    Status {
        target: String,
        status: tonic::Status,
    },
    #[error("cannot send the fd of {path}: {source}")]
    Fd {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What to register.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The endpoint, its `url` as it listens (`unix:///…` or `tcp://…`).
    pub endpoint: NetworkServiceEndpoint,
    /// Registered before the endpoint (`NSM_REGISTER_SERVICE=true`).
    pub services: Vec<NetworkService>,
    /// `Unregister` when stopping (`NSM_UNREGISTER_ITSELF=true`).
    pub unregister_on_exit: bool,
}

/// The registry's private path, as sdk's `grpcmetadata` marshals it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct RegPath {
    #[serde(rename = "Index")]
    index: u32,
    #[serde(rename = "PathSegments")]
    path_segments: Option<Vec<RegSegment>>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct RegSegment {
    token: String,
}

/// Registers one endpoint and keeps it registered.
pub struct Registrar {
    dialer: Dialer,
    tokens: Arc<TokenIssuer>,
    reg: Registration,
    /// The paths the registry handed back, per resource, for refreshes.
    paths: Mutex<std::collections::HashMap<String, RegPath>>,
    /// Where each registration's result is counted.
    metrics: Option<Arc<crate::metrics::CallMetrics>>,
}

impl Registrar {
    pub fn new(dialer: Dialer, tokens: Arc<TokenIssuer>, reg: Registration) -> Registrar {
        Registrar {
            dialer,
            tokens,
            reg,
            paths: Mutex::default(),
            metrics: None,
        }
    }

    /// Counts every registration and refresh in `metrics` by result.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::CallMetrics>) -> Registrar {
        self.metrics = Some(metrics);
        self
    }

    pub fn registration(&self) -> &Registration {
        &self.reg
    }

    fn request<T>(
        &self,
        session: &Session,
        key: &str,
        msg: T,
        left: Duration,
    ) -> Result<tonic::Request<T>, RegisterError> {
        let mut req = session.call(msg, &self.tokens, left)?;
        let path = self
            .paths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
            .unwrap_or_default();
        if let Ok(v) = serde_json::to_string(&path).unwrap_or_default().parse() {
            req.metadata_mut().insert(PATH_METADATA, v);
        }
        Ok(req)
    }

    /// Keeps the path the registry returned in its `path` header.
    fn keep_path(&self, key: &str, headers: &MetadataMap) {
        let Some(p) = headers
            .get(PATH_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| serde_json::from_str::<RegPath>(s).ok())
        else {
            return;
        };
        self.paths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned(), p);
    }

    fn status(&self, status: tonic::Status) -> RegisterError {
        RegisterError::Status {
            target: self.dialer.url().to_owned(),
            status,
        }
    }

    /// The endpoint as sent: a unix URL becomes the inode URL of the socket
    /// file, whose `O_PATH` fd is queued on `session`.
    fn endpoint_for(
        &self,
        session: &Session,
        expiration: Option<SystemTime>,
    ) -> Result<(NetworkServiceEndpoint, Option<OwnedFd>), RegisterError> {
        let mut nse = self.reg.endpoint.clone();
        nse.expiration_time = expiration.map(to_timestamp);
        let Some(path) = nse.url.strip_prefix("unix://").map(PathBuf::from) else {
            return Ok((nse, None));
        };
        let fd_err = |source| RegisterError::Fd {
            path: path.clone(),
            source,
        };
        let fd = open_path(&path).map_err(fd_err)?;
        let url = match session.fds() {
            Some(fds) => fds.send_fd(fd.as_fd()).map_err(fd_err)?,
            // Over TCP no fd travels: the registry gets the inode URL alone.
            None => inode_url_of(fd.as_fd()).map_err(fd_err)?,
        };
        nse.url = url.to_string();
        Ok((nse, Some(fd)))
    }

    /// One registration: the services, then the endpoint. Returns when the
    /// registry expires it.
    pub async fn register(&self) -> Result<Option<SystemTime>, RegisterError> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        for ns in &self.reg.services {
            let session = self.dialer.dial(deadline).await?;
            let left = deadline.saturating_duration_since(Instant::now());
            let key = format!("ns/{}", ns.name);
            let req = self.request(&session, &key, ns.clone(), left)?;
            let resp = NetworkServiceRegistryClient::new(session.channel())
                .register(req)
                .await
                .map_err(|s| self.status(s))?;
            self.keep_path(&key, resp.metadata());
        }
        let session = self.dialer.dial(deadline).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        let (nse, _fd) = self.endpoint_for(&session, None)?;
        let key = format!("nse/{}", nse.name);
        let req = self.request(&session, &key, nse, left)?;
        let resp = NetworkServiceEndpointRegistryClient::new(session.channel())
            .register(req)
            .await
            .map_err(|s| self.status(s))?;
        self.keep_path(&key, resp.metadata());
        Ok(resp
            .into_inner()
            .expiration_time
            .as_ref()
            .and_then(from_timestamp))
    }

    /// `Unregister` of the endpoint (services stay: others may provide them).
    pub async fn unregister(&self) -> Result<(), RegisterError> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        let session = self.dialer.dial(deadline).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        let (nse, _fd) = self.endpoint_for(&session, None)?;
        let key = format!("nse/{}", nse.name);
        let req = self.request(&session, &key, nse, left)?;
        NetworkServiceEndpointRegistryClient::new(session.channel())
            .unregister(req)
            .await
            .map_err(|s| self.status(s))?;
        Ok(())
    }

    /// Registers, refreshes and retries until `stop` completes; then
    /// unregisters if asked to.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut backoff = MIN_BACKOFF;
        loop {
            let result = self.register().await;
            if let Some(m) = &self.metrics {
                m.registered(&match &result {
                    Ok(_) => "ok".to_owned(),
                    Err(RegisterError::Status { status, .. }) => format!("{:?}", status.code()),
                    Err(RegisterError::Call(e)) => format!("{:?}", e.code()),
                    Err(RegisterError::Fd { .. }) => "fd".to_owned(),
                });
            }
            let wait = match result {
                Err(RegisterError::Status { status, .. })
                    if status.code() == tonic::Code::Unimplemented =>
                {
                    // An endpoint as next hop (a lab without nsmgr): nothing to register with.
                    tracing::info!(registry = %self.dialer.url(), "it serves no registry: not registering");
                    stop.await;
                    return;
                }
                Ok(expires) => {
                    backoff = MIN_BACKOFF;
                    let next = refresh_after(expires, SystemTime::now());
                    tracing::info!(
                        name = %self.reg.endpoint.name,
                        registry = %self.dialer.url(),
                        expires = ?expires.map(metadata::rfc3339),
                        refresh_in = ?next,
                        "registered"
                    );
                    next
                }
                Err(RegisterError::Status { status, .. })
                    if status.code() == tonic::Code::PermissionDenied =>
                {
                    // Policy, not weather: say why, and ask again seldom.
                    backoff = MAX_BACKOFF;
                    let wait = jitter(backoff);
                    tracing::error!(
                        name = %self.reg.endpoint.name,
                        registry = %self.dialer.url(),
                        reason = status.message(),
                        retry_in = ?wait,
                        "cannot register: refused (PermissionDenied); NSM's registry keeps a name with the identity that registered it first, so another identity may hold this name"
                    );
                    wait
                }
                Err(e) => {
                    let wait = jitter(backoff);
                    tracing::warn!(registry = %self.dialer.url(), error = %e, retry_in = ?wait, "cannot register");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                }
            };
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        if self.reg.unregister_on_exit {
            match self.unregister().await {
                Ok(()) => tracing::info!(name = %self.reg.endpoint.name, "unregistered"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot unregister; the registry expires the endpoint itself")
                }
            }
        }
    }
}

/// A registration running in the background.
pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Registrar {
    /// [`Registrar::run`] in a task, once the endpoint's socket file exists
    /// (it is bound by the server starting beside it).
    pub fn start(self: Arc<Self>) -> Running {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let socket = self
            .reg
            .endpoint
            .url
            .strip_prefix("unix://")
            .map(PathBuf::from);
        let task = tokio::spawn(async move {
            if let Some(p) = socket {
                for _ in 0..200 {
                    if p.exists() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
            self.run(async {
                let _ = rx.await;
            })
            .await;
        });
        Running {
            stop: Some(tx),
            task,
        }
    }
}

impl Running {
    /// Stops refreshing, unregisters if asked to, and waits for that.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(CALL_TIMEOUT + Duration::from_secs(1), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

/// 2/3 of the time left until `expires` (sdk's refresh client), bounded.
pub fn refresh_after(expires: Option<SystemTime>, now: SystemTime) -> Duration {
    match expires {
        Some(t) => (t.duration_since(now).unwrap_or_default() * 2 / 3).max(MIN_REFRESH),
        None => DEFAULT_REFRESH,
    }
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.8..1.2))
}

/// An `O_PATH` fd of `path` (a socket file cannot be opened for reading).
fn open_path(path: &FsPath) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    open(path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_at_two_thirds_of_what_is_left() {
        let now = SystemTime::now();
        assert_eq!(
            refresh_after(Some(now + Duration::from_secs(60)), now),
            Duration::from_secs(40)
        );
        assert_eq!(refresh_after(Some(now), now), MIN_REFRESH);
        assert_eq!(refresh_after(None, now), DEFAULT_REFRESH);
    }

    #[test]
    fn the_path_marshals_as_go_does() {
        let p = RegPath::default();
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"Index":0,"PathSegments":null}"#
        );
        let back: RegPath =
            serde_json::from_str(r#"{"Index":1,"PathSegments":[{"token":"a"},{"token":"b"}]}"#)
                .unwrap();
        assert_eq!(back.index, 1);
        assert_eq!(back.path_segments.unwrap().len(), 2);
    }
}
