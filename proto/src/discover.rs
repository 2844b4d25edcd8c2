//! NSM's discovery, client side: the endpoints a registry (nsmgr) knows for
//! a network service, or by name. It is how an NSM forwarder finds where a
//! Request goes next (sdk's `discover` + `roundrobin` in the forwarder):
//! nsmgr picks the forwarder, the forwarder picks the endpoint and dials it
//! itself. A local endpoint's URL comes back as `inode://dev/ino` with the
//! `O_PATH` fd of its socket file beside the answer (grpcfd), dialled
//! through `/proc/self/fd/<n>`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::inode::InodeUrl;
use crate::path::from_timestamp;
use crate::register::PATH_METADATA;
use crate::registry::network_service_endpoint_registry_client::NetworkServiceEndpointRegistryClient;
use crate::registry::{NetworkServiceEndpoint, NetworkServiceEndpointQuery};
use crate::token::TokenIssuer;
use crate::transport::{CallError, Dialer, Session, Target};

/// At most this many endpoints are read from one answer.
pub const MAX_FOUND: usize = 1024;
/// How long to wait for an endpoint's socket fd that did not come with the answer.
const FD_GRACE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("registry {0}")]
    Call(#[from] CallError),
    #[error("registry {target}: {status}")]
    Status {
        target: String,
        status: tonic::Status,
    },
    #[error("registry {target} knows more than {MAX_FOUND} endpoints for the query")]
    TooMany { target: String },
    #[error("endpoint {name:?}: unusable URL {url:?}: {why}")]
    Url {
        name: String,
        url: String,
        why: String,
    },
}

impl DiscoverError {
    /// The registry does not serve discovery (the next hop is an endpoint).
    pub fn is_unimplemented(&self) -> bool {
        matches!(self, DiscoverError::Status { status, .. } if status.code() == tonic::Code::Unimplemented)
    }
}

/// A registry's answer, with the connection the endpoints' socket fds came on.
pub struct Found {
    pub endpoints: Vec<NetworkServiceEndpoint>,
    session: Session,
}

/// Where to dial an endpoint: a socket path, kept valid by the fd it may
/// name (`/proc/self/fd/<n>`) for as long as this lives.
#[derive(Debug)]
pub struct EndpointSocket {
    pub target: Target,
    _fd: Option<OwnedFd>,
}

/// Asks `dialer`'s registry for the endpoints matching `query` (`name`,
/// `network_service_names`), expired ones left out.
pub async fn find(
    dialer: &Dialer,
    tokens: &TokenIssuer,
    query: NetworkServiceEndpoint,
    deadline: Instant,
) -> Result<Found, DiscoverError> {
    let target = dialer.url().to_owned();
    let status = |status| DiscoverError::Status {
        target: target.clone(),
        status,
    };
    let session = dialer.dial(deadline).await?;
    let mut req = session.call(
        NetworkServiceEndpointQuery {
            network_service_endpoint: Some(query),
            watch: false,
        },
        tokens,
        deadline.saturating_duration_since(Instant::now()),
    )?;
    if let Ok(v) = "{}".parse() {
        req.metadata_mut().insert(PATH_METADATA, v);
    }
    let mut stream = NetworkServiceEndpointRegistryClient::new(session.channel())
        .find(req)
        .await
        .map_err(status)?
        .into_inner();
    let now = SystemTime::now();
    let mut endpoints = Vec::new();
    while let Some(resp) = stream.message().await.map_err(status)? {
        if endpoints.len() == MAX_FOUND {
            return Err(DiscoverError::TooMany { target });
        }
        let Some(nse) = resp.network_service_endpoint else {
            continue;
        };
        let expired = nse
            .expiration_time
            .as_ref()
            .and_then(from_timestamp)
            .is_some_and(|t| t <= now);
        if !resp.deleted && !expired {
            endpoints.push(nse);
        }
    }
    Ok(Found { endpoints, session })
}

impl Found {
    /// Where to dial `nse`: its `unix://` path, its `tcp://` address, or for
    /// `inode://dev/ino` the socket fd that came with the answer.
    pub async fn socket(
        &self,
        nse: &NetworkServiceEndpoint,
    ) -> Result<EndpointSocket, DiscoverError> {
        let bad = |why: String| DiscoverError::Url {
            name: nse.name.clone(),
            url: nse.url.clone(),
            why,
        };
        if nse.url.starts_with(InodeUrl::SCHEME) {
            let inode: InodeUrl = nse.url.parse().map_err(|e| bad(format!("{e}")))?;
            let fds = self
                .session
                .fds()
                .ok_or_else(|| bad("no fds travel over this connection".into()))?;
            let fd = match fds.try_recv_fd(&inode) {
                Ok(Some(fd)) => fd,
                _ => fds
                    .recv_fd(&inode, FD_GRACE)
                    .await
                    .map_err(|e| bad(format!("no fd for its socket came with the answer: {e}")))?,
            };
            let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            return Ok(EndpointSocket {
                target: Target::Unix(path),
                _fd: Some(fd),
            });
        }
        let target: Target = nse.url.parse().map_err(bad)?;
        Ok(EndpointSocket { target, _fd: None })
    }
}
