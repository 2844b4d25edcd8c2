//! Where a Request goes after this hop. Behind NSM's nsmgr (`NSM_CONNECT_TO`
//! serves a registry) the hop picks the endpoint itself, as NSM's forwarders
//! do (sdk `discover` + `roundrobin`): the one the connection names (a
//! refresh, a heal), else one of the endpoints registered for its network
//! service, in turn; then it dials that endpoint directly. When the next hop
//! answers discovery with Unimplemented it is an endpoint (a lab without
//! nsmgr) and every Request goes to it; that answer is kept.
//!
//! Not covered yet: a NetworkService's `matches` (label selection between
//! endpoints) and interdomain names (`service@domain`).

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use nsm_api::connection::Connection;
use nsm_api::discover::{self, DiscoverError, EndpointSocket};
use nsm_api::registry::NetworkServiceEndpoint;
use nsm_api::tls::TlsError;
use tokio::time::Instant;
use tonic::Code;

use super::downstream::NextHop;

const UNKNOWN: u8 = 0;
const DIRECT: u8 = 1;
const DISCOVER: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("discovering the endpoint: {0}")]
    Discover(#[from] DiscoverError),
    #[error("no endpoint of network service {service:?} is registered with {registry}")]
    NoEndpoint { service: String, registry: String },
    #[error("endpoint {name:?} is not registered with {registry}")]
    Gone { name: String, registry: String },
    #[error("a client for endpoint {name:?}: {source}")]
    Tls {
        name: String,
        #[source]
        source: TlsError,
    },
}

impl RouteError {
    pub fn code(&self) -> Code {
        match self {
            RouteError::Discover(DiscoverError::Call(c)) => c.code(),
            RouteError::Discover(DiscoverError::Status { status, .. }) => status.code(),
            RouteError::Discover(DiscoverError::TooMany { .. }) => Code::ResourceExhausted,
            RouteError::Discover(_) | RouteError::Tls { .. } => Code::Internal,
            RouteError::NoEndpoint { .. } | RouteError::Gone { .. } => Code::Unavailable,
        }
    }
}

/// Chooses each Request's next hop.
pub struct Router {
    /// `NSM_CONNECT_TO`: nsmgr (whose registry it asks), or an endpoint.
    configured: NextHop,
    mode: AtomicU8,
    turn: AtomicUsize,
}

/// A chosen next hop; the endpoint's socket fd (if it came as one) is held
/// as long as this lives.
pub struct Routed {
    pub hop: NextHop,
    _socket: Option<EndpointSocket>,
}

impl Routed {
    /// A next hop known otherwise (e.g. recorded with the connection).
    pub fn to(hop: NextHop) -> Routed {
        Routed { hop, _socket: None }
    }
}

impl Router {
    pub fn new(configured: NextHop) -> Router {
        Router {
            configured,
            mode: AtomicU8::new(UNKNOWN),
            turn: AtomicUsize::new(0),
        }
    }

    pub fn configured(&self) -> &NextHop {
        &self.configured
    }

    fn direct(&self) -> Routed {
        Routed::to(self.configured.clone())
    }

    /// The next hop for `conn`, whose `network_service_endpoint_name` is set
    /// to the endpoint chosen (as NSM's discover does).
    pub async fn route(
        &self,
        conn: &mut Connection,
        deadline: Instant,
    ) -> Result<Routed, RouteError> {
        if self.mode.load(Ordering::Relaxed) == DIRECT {
            return Ok(self.direct());
        }
        let name = conn.network_service_endpoint_name.clone();
        let query = if name.is_empty() {
            NetworkServiceEndpoint {
                network_service_names: vec![conn.network_service.clone()],
                ..Default::default()
            }
        } else {
            NetworkServiceEndpoint {
                name: name.clone(),
                ..Default::default()
            }
        };
        let found = match discover::find(
            self.configured.dialer(),
            self.configured.tokens(),
            query,
            deadline,
        )
        .await
        {
            // Concurrent first Requests may all ask: each takes the answer.
            Err(e) if e.is_unimplemented() && self.mode.load(Ordering::Relaxed) != DISCOVER => {
                tracing::info!(next_hop = %self.configured.url(), "the next hop serves no registry: it is the endpoint");
                self.mode.store(DIRECT, Ordering::Relaxed);
                return Ok(self.direct());
            }
            r => r?,
        };
        self.mode.store(DISCOVER, Ordering::Relaxed);
        let candidates: Vec<&NetworkServiceEndpoint> = found
            .endpoints
            .iter()
            .filter(|e| {
                if name.is_empty() {
                    e.network_service_names.contains(&conn.network_service)
                } else {
                    e.name == name
                }
            })
            .collect();
        let chosen = match (candidates.len(), name.is_empty()) {
            (0, true) => {
                return Err(RouteError::NoEndpoint {
                    service: conn.network_service.clone(),
                    registry: self.configured.url().to_owned(),
                });
            }
            (0, false) => {
                return Err(RouteError::Gone {
                    name,
                    registry: self.configured.url().to_owned(),
                });
            }
            (n, _) => candidates[self.turn.fetch_add(1, Ordering::Relaxed) % n],
        };
        let socket = found.socket(chosen).await?;
        let hop = self
            .configured
            .to(socket.target.clone())
            .map_err(|source| RouteError::Tls {
                name: chosen.name.clone(),
                source,
            })?;
        tracing::debug!(id = %conn.id, endpoint = %chosen.name, url = %chosen.url, "discovered");
        conn.network_service_endpoint_name = chosen.name.clone();
        Ok(Routed {
            hop,
            _socket: Some(socket),
        })
    }

    /// Where to Close `conn`: the endpoint it names, if still registered.
    pub async fn route_close(
        &self,
        conn: &Connection,
        deadline: Instant,
    ) -> Result<Routed, RouteError> {
        if self.mode.load(Ordering::Relaxed) == DIRECT
            || conn.network_service_endpoint_name.is_empty()
        {
            return Ok(self.direct());
        }
        let mut named = conn.clone();
        self.route(&mut named, deadline).await
    }
}
