//! The hop's client side: every call to the next hop goes over a FRESH
//! grpcfd connection (as NSM's dial client does, refreshes included), with
//! the hop's token as `nsm-client-token` metadata; the endpoint's netns fd
//! comes back on that connection, named by the returned mechanism's
//! `inodeURL`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nsm_api::connection::{Connection, Mechanism};
use nsm_api::grpcfd::{self, FdChannel};
use nsm_api::inode::InodeUrl;
use nsm_api::mechanism::{self as mech, MechanismExt};
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::networkservice::network_service_client::NetworkServiceClient;
use nsm_api::{TOKEN_EXPIRES_METADATA, TOKEN_METADATA};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::netns::{Netns, NetnsError};

/// How long to wait for a netns fd that did not come with the message
/// (grpcfd writes fds before the bytes of the message they belong to, so a
/// missing one is not on its way), before looking the inode up instead.
pub const FD_GRACE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum DownstreamError {
    #[error("next hop {url} is unavailable: {why}")]
    Dial { url: String, why: String },
    #[error("next hop {url} did not answer within {after:?}")]
    Deadline { url: String, after: Duration },
    #[error("next hop {url}: {}", .status.message())]
    Status { url: String, status: tonic::Status },
    #[error("next hop {url} returned an unusable connection: {why}")]
    BadAnswer { url: String, why: String },
    #[error("endpoint network namespace {inode}: {source}")]
    EndpointNetns {
        inode: InodeUrl,
        #[source]
        source: NetnsError,
    },
}

/// A call's token: our path segment's, as updatetoken set it.
#[derive(Debug, Clone)]
pub struct CallToken {
    pub jwt: String,
    pub expires: SystemTime,
}

#[derive(Debug, Clone)]
pub struct NextHop {
    path: PathBuf,
    url: String,
    dial_timeout: Duration,
}

/// The next hop's answer, with the connection its fds arrived on.
pub struct Accepted {
    pub conn: Connection,
    fds: FdChannel,
    /// Held until the endpoint's fd has been taken.
    _channel: Channel,
}

impl NextHop {
    pub fn new(path: &Path, dial_timeout: Duration) -> NextHop {
        NextHop {
            path: path.to_owned(),
            url: format!("unix://{}", path.display()),
            dial_timeout,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    async fn dial(
        &self,
        deadline: Instant,
    ) -> Result<(NetworkServiceClient<Channel>, Channel, FdChannel), DownstreamError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = self.dial_timeout.min(left);
        let dial = grpcfd::dial_with_timeout(&self.path, timeout);
        match tokio::time::timeout(timeout, dial).await {
            Ok(Ok((channel, fds))) => {
                Ok((NetworkServiceClient::new(channel.clone()), channel, fds))
            }
            Ok(Err(e)) => Err(DownstreamError::Dial {
                url: self.url.clone(),
                why: error_chain(&e),
            }),
            Err(_) if timeout < self.dial_timeout => Err(DownstreamError::Deadline {
                url: self.url.clone(),
                after: timeout,
            }),
            Err(_) => Err(DownstreamError::Dial {
                url: self.url.clone(),
                why: format!("no connection within NSM_DIAL_TIMEOUT {timeout:?}"),
            }),
        }
    }

    /// Requests `conn` with an empty KERNEL preference (`{LOCAL, KERNEL,
    /// {}}`, as NSM's kernel forwarders ask: the endpoint names its own side).
    pub async fn request(
        &self,
        conn: Connection,
        token: &CallToken,
        deadline: Instant,
    ) -> Result<Accepted, DownstreamError> {
        let (mut client, channel, fds) = self.dial(deadline).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = NetworkServiceRequest {
            connection: Some(conn),
            mechanism_preferences: vec![mech::kernel([])],
        };
        match tokio::time::timeout(left, client.request(with_token(msg, token, left))).await {
            Ok(Ok(resp)) => Ok(Accepted {
                conn: resp.into_inner(),
                fds,
                _channel: channel,
            }),
            Ok(Err(status)) => Err(self.status(status, left)),
            Err(_) => Err(DownstreamError::Deadline {
                url: self.url.clone(),
                after: left,
            }),
        }
    }

    /// Closes `conn` downstream (a fresh connection too).
    pub async fn close(
        &self,
        conn: Connection,
        token: &CallToken,
        timeout: Duration,
    ) -> Result<(), DownstreamError> {
        let deadline = Instant::now() + timeout;
        let (mut client, _channel, _fds) = self.dial(deadline).await?;
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, client.close(with_token(conn, token, left))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(self.status(status, left)),
            Err(_) => Err(DownstreamError::Deadline {
                url: self.url.clone(),
                after: left,
            }),
        }
    }

    fn status(&self, status: tonic::Status, left: Duration) -> DownstreamError {
        // tonic reports its own client-side timeout as Cancelled.
        if status.code() == tonic::Code::Cancelled && status.message().contains("Timeout") {
            return DownstreamError::Deadline {
                url: self.url.clone(),
                after: left,
            };
        }
        DownstreamError::Status {
            url: self.url.clone(),
            status,
        }
    }

    /// The endpoint's KERNEL mechanism (`name`, `inodeURL`) and its netns:
    /// the fd that came with the answer (none: refused).
    pub async fn endpoint_netns(
        &self,
        acc: &Accepted,
    ) -> Result<(Mechanism, Netns), DownstreamError> {
        let bad = |why: String| DownstreamError::BadAnswer {
            url: self.url.clone(),
            why,
        };
        let m = acc
            .conn
            .mechanism
            .clone()
            .ok_or_else(|| bad("connection.mechanism is missing".into()))?;
        if m.cls != mech::CLS_LOCAL || !m.is_kernel() {
            return Err(bad(format!(
                "mechanism {}/{} is not LOCAL/KERNEL",
                m.cls, m.r#type
            )));
        }
        let name = m
            .interface_name()
            .ok_or_else(|| bad("the KERNEL mechanism has no name".into()))?;
        mech::validate_interface_name(name)
            .map_err(|e| bad(format!("KERNEL mechanism name: {e}")))?;
        let inode = m
            .inode_url()
            .map_err(|e| bad(format!("KERNEL mechanism inodeURL: {e}")))?;
        let ns = receive_netns(&acc.fds, inode, "the endpoint's netns fd")
            .await
            .map_err(|source| DownstreamError::EndpointNetns { inode, source })?
            .ok_or_else(|| {
                bad(format!(
                    "no fd for its network namespace {inode} came with the answer (grpcfd): \
                     a namespace is plumbed only through its fd"
                ))
            })?;
        Ok((m, ns))
    }
}

/// The netns fd named `inode` on `fds`, checked to be a network namespace;
/// `None` when the peer sent none (within a short grace). The fd is the
/// authority: a namespace is never looked up by its inode number, which
/// anyone can name.
pub async fn receive_netns(
    fds: &FdChannel,
    inode: InodeUrl,
    what: &str,
) -> Result<Option<Netns>, NetnsError> {
    let fd = match fds.try_recv_fd(&inode) {
        Ok(Some(fd)) => Some(fd),
        _ => fds.recv_fd(&inode, FD_GRACE).await.ok(),
    };
    // The fd is indexed by the inode the peer named, so it is that file;
    // whether it is a network namespace is checked here.
    fd.map(|fd| Netns::from_fd(fd, &format!("{what} {inode}")))
        .transpose()
}

fn with_token<T>(msg: T, token: &CallToken, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(timeout);
    let md = req.metadata_mut();
    // JWTs and RFC 3339 text are plain ASCII, so these parses cannot fail.
    if let Ok(v) = token.jwt.parse() {
        md.insert(TOKEN_METADATA, v);
    }
    if let Ok(v) = rfc3339(token.expires).parse() {
        md.insert(TOKEN_EXPIRES_METADATA, v);
    }
    req
}

/// Go's RFC3339Nano in UTC, as NSM sends `nsm-client-token-expires`.
pub fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// `e: cause: cause`: tonic's transport errors hide the useful part
/// ("No such file or directory") in their sources.
fn error_chain(e: &dyn std::error::Error) -> String {
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
