//! The one NSM client every hop and client of this workspace uses to call
//! the next hop: a fresh connection per call (as NSM's forwarders and
//! clients dial one per Request, refreshes included), grpcfd beside it over
//! unix, the caller's token in `nsm-client-token` metadata, and the call
//! bounded by a deadline. Errors say which target failed and how: it could
//! not be dialled, it did not answer in time, or it answered with a status.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::connection::Connection;
use crate::grpcfd::{self, FdChannel};
use crate::metadata;
use crate::networkservice::NetworkServiceRequest;
use crate::networkservice::network_service_client::NetworkServiceClient;
use crate::tls::{Identity, PeerSvid, TlsError};
use crate::token::{Token, TokenIssuer};

use super::secure::{connect_tcp, connect_unix};

/// The URI tonic's requests carry; our connectors ignore it, and its
/// authority is what grpc-go sends over unix sockets.
const AUTHORITY_URI: &str = "http://localhost";

/// Where a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A unix socket: fds travel beside the messages.
    Unix(PathBuf),
    /// `host:port` over TCP: no fds.
    Tcp(String),
}

impl std::str::FromStr for Target {
    type Err = String;

    /// `unix:///absolute/path` or `tcp://host:port`.
    fn from_str(s: &str) -> Result<Target, String> {
        match (s.strip_prefix("unix://"), s.strip_prefix("tcp://")) {
            (Some(p), _) if p.starts_with('/') && p.len() > 1 => Ok(Target::Unix(PathBuf::from(p))),
            (_, Some(hp))
                if hp
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
            {
                Ok(Target::Tcp(hp.to_owned()))
            }
            _ => Err(format!("{s:?}: expected unix:///path or tcp://host:port")),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "unix://{}", p.display()),
            Target::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{target} is unavailable: {why}")]
    Dial { target: String, why: String },
    #[error("{target} did not answer within {after:?}")]
    Deadline { target: String, after: Duration },
    #[error("cannot call {target}: {why}")]
    Token { target: String, why: String },
    #[error("{target}: {}", .status.message())]
    Status {
        target: String,
        status: tonic::Status,
    },
}

impl CallError {
    /// The gRPC code the failure is best told by.
    pub fn code(&self) -> tonic::Code {
        match self {
            CallError::Dial { .. } => tonic::Code::Unavailable,
            CallError::Deadline { .. } => tonic::Code::DeadlineExceeded,
            CallError::Token { .. } => tonic::Code::Unauthenticated,
            CallError::Status { status, .. } => status.code(),
        }
    }
}

/// Dials one target, fresh for every call.
#[derive(Debug, Clone)]
pub struct Dialer {
    target: Target,
    name: String,
    dial_timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// One fresh connection to the target, ready for one call: fds queued on
/// [`Session::fds`] go out with the call's first bytes.
pub struct Session {
    client: NetworkServiceClient<Channel>,
    channel: Channel,
    fds: Option<FdChannel>,
    target: String,
    server: Option<PeerSvid>,
}

/// The target's answer to a Request, with the connection it came on (its
/// fds arrived there; keep it until they are taken).
pub struct Answer {
    pub conn: Connection,
    pub fds: Option<FdChannel>,
    _channel: Channel,
}

impl Dialer {
    pub fn new(target: Target, dial_timeout: Duration) -> Dialer {
        Dialer {
            name: target.to_string(),
            target,
            dial_timeout,
            tls: None,
        }
    }

    /// Calls over mTLS with `identity`'s SVID (`None`: plaintext).
    pub fn with_tls(mut self, identity: Option<&Arc<Identity>>) -> Result<Dialer, TlsError> {
        self.tls = identity.map(|i| i.client_config()).transpose()?;
        Ok(self)
    }

    /// `unix://…` or `tcp://…`.
    pub fn url(&self) -> &str {
        &self.name
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn dial_timeout(&self) -> Duration {
        self.dial_timeout
    }

    /// A fresh connection, within the dial timeout and what is left before
    /// `deadline`.
    pub async fn dial(&self, deadline: Instant) -> Result<Session, CallError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = self.dial_timeout.min(left);
        // The server's SVID, as the TLS connectors saw it.
        let server: Arc<Mutex<Option<PeerSvid>>> = Arc::default();
        let dial = async {
            let endpoint = Endpoint::from_static(AUTHORITY_URI).connect_timeout(timeout);
            match (&self.target, &self.tls) {
                (Target::Unix(path), None) => grpcfd::dial_with_timeout(path, timeout)
                    .await
                    .map(|(ch, fds)| (ch, Some(fds))),
                (Target::Unix(path), Some(cfg)) => {
                    let fds = FdChannel::new();
                    // One connection only: fds belong to it.
                    let slot = Arc::new(Mutex::new(Some(fds.clone())));
                    let (path, cfg, seen) = (path.clone(), cfg.clone(), server.clone());
                    let connector = tower::service_fn(move |_: Uri| {
                        let (slot, path, cfg) = (slot.clone(), path.clone(), cfg.clone());
                        let seen = seen.clone();
                        async move {
                            let fds = slot
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .take()
                                .ok_or_else(|| {
                                    std::io::Error::other("the server closed the connection before the call completed (one connection per call: not redialled)")
                                })?;
                            let (io, svid) = connect_unix(&path, fds, cfg).await?;
                            *seen.lock().unwrap_or_else(|p| p.into_inner()) = svid;
                            Ok::<_, std::io::Error>(io)
                        }
                    });
                    endpoint
                        .connect_with_connector(connector)
                        .await
                        .map(|ch| (ch, Some(fds)))
                }
                (Target::Tcp(addr), None) => Endpoint::from_shared(format!("http://{addr}"))?
                    .connect_timeout(timeout)
                    .connect()
                    .await
                    .map(|ch| (ch, None)),
                (Target::Tcp(addr), Some(cfg)) => {
                    let (addr, cfg, seen) = (addr.clone(), cfg.clone(), server.clone());
                    let connector = tower::service_fn(move |_: Uri| {
                        let (addr, cfg, seen) = (addr.clone(), cfg.clone(), seen.clone());
                        async move {
                            let (io, svid) = connect_tcp(&addr, cfg).await?;
                            *seen.lock().unwrap_or_else(|p| p.into_inner()) = svid;
                            Ok::<_, std::io::Error>(io)
                        }
                    });
                    endpoint
                        .connect_with_connector(connector)
                        .await
                        .map(|ch| (ch, None))
                }
            }
        };
        match tokio::time::timeout(timeout, dial).await {
            Ok(Ok((channel, fds))) => Ok(Session {
                client: NetworkServiceClient::new(channel.clone()),
                channel,
                fds,
                target: self.name.clone(),
                server: server.lock().unwrap_or_else(|p| p.into_inner()).take(),
            }),
            Ok(Err(e)) => Err(CallError::Dial {
                target: self.name.clone(),
                why: error_chain(&e),
            }),
            Err(_) if timeout < self.dial_timeout => Err(CallError::Deadline {
                target: self.name.clone(),
                after: timeout,
            }),
            Err(_) => Err(CallError::Dial {
                target: self.name.clone(),
                why: format!("no connection within the dial timeout {timeout:?}"),
            }),
        }
    }

    /// [`Dialer::dial`], then [`Session::request`].
    pub async fn request(
        &self,
        req: NetworkServiceRequest,
        tokens: &TokenIssuer,
        deadline: Instant,
    ) -> Result<Answer, CallError> {
        self.dial(deadline)
            .await?
            .request(req, tokens, deadline)
            .await
    }

    /// [`Dialer::dial`], then [`Session::close`].
    pub async fn close(
        &self,
        conn: Connection,
        tokens: &TokenIssuer,
        deadline: Instant,
    ) -> Result<(), CallError> {
        self.dial(deadline)
            .await?
            .close(conn, tokens, deadline)
            .await
    }
}

impl Session {
    /// The connection's fd side channel (unix targets only).
    pub fn fds(&self) -> Option<&FdChannel> {
        self.fds.as_ref()
    }

    /// The server's SVID (TLS only).
    pub fn server(&self) -> Option<&PeerSvid> {
        self.server.as_ref()
    }

    /// The connection, for the server's other services (MonitorConnection).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// `msg` with our per-RPC token for this server (`aud` its SPIFFE ID,
    /// as NSM's per-RPC credentials make it), for any call on this session
    /// (a stream that must outlive a deadline takes it as it is).
    pub fn signed<T>(&self, msg: T, tokens: &TokenIssuer) -> Result<tonic::Request<T>, CallError> {
        let token: Token =
            tokens
                .issue_for(self.server.as_ref())
                .map_err(|e| CallError::Token {
                    target: self.target.clone(),
                    why: e.to_string(),
                })?;
        let mut req = tonic::Request::new(msg);
        metadata::insert_token(req.metadata_mut(), &token);
        crate::telemetry::inject(req.metadata_mut());
        Ok(req)
    }

    /// [`Session::signed`] with `timeout` for the call.
    pub fn call<T>(
        &self,
        msg: T,
        tokens: &TokenIssuer,
        timeout: Duration,
    ) -> Result<tonic::Request<T>, CallError> {
        let mut req = self.signed(msg, tokens)?;
        req.set_timeout(timeout);
        Ok(req)
    }

    fn failed(&self, status: tonic::Status, left: Duration) -> CallError {
        // tonic reports its own client-side timeout as Cancelled.
        if status.code() == tonic::Code::Cancelled && status.message().contains("Timeout") {
            return CallError::Deadline {
                target: self.target.clone(),
                after: left,
            };
        }
        // A status tonic made here from a broken connection (the peer
        // refused our TLS, or spoke none; h2 or hyper's error is its source,
        // as Unknown, Internal or Cancelled — a server's own status has no
        // source): the connection failed, not the call.
        if let Some(cause) = std::error::Error::source(&status) {
            return CallError::Dial {
                target: self.target.clone(),
                why: error_chain(cause),
            };
        }
        CallError::Status {
            target: self.target.clone(),
            status,
        }
    }

    pub async fn request(
        mut self,
        req: NetworkServiceRequest,
        tokens: &TokenIssuer,
        deadline: Instant,
    ) -> Result<Answer, CallError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let call = self.call(req, tokens, left)?;
        match tokio::time::timeout(left, self.client.request(call)).await {
            Ok(Ok(resp)) => Ok(Answer {
                conn: resp.into_inner(),
                fds: self.fds,
                _channel: self.channel,
            }),
            Ok(Err(status)) => Err(self.failed(status, left)),
            Err(_) => Err(CallError::Deadline {
                target: self.target,
                after: left,
            }),
        }
    }

    pub async fn close(
        mut self,
        conn: Connection,
        tokens: &TokenIssuer,
        deadline: Instant,
    ) -> Result<(), CallError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let call = self.call(conn, tokens, left)?;
        match tokio::time::timeout(left, self.client.close(call)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(self.failed(status, left)),
            Err(_) => Err(CallError::Deadline {
                target: self.target,
                after: left,
            }),
        }
    }
}

/// `e: cause: cause`: tonic's transport errors hide the useful part ("No
/// such file or directory") in their sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s
}
