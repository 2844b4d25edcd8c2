//! The hop's client side: every call to the next hop goes over a FRESH
//! grpcfd connection (`nsm_api::transport::Dialer`, as NSM's dial client
//! does, refreshes included), mTLS unless insecure, with a token of ours for
//! that hop as `nsm-client-token` metadata; the endpoint's netns fd comes
//! back on that connection, named by the returned mechanism's `inodeURL`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nsm_api::connection::monitor_connection_client::MonitorConnectionClient;
use nsm_api::connection::{
    Connection, ConnectionEvent, Mechanism, MonitorScopeSelector, PathSegment,
};
use nsm_api::grpcfd::FdChannel;
use nsm_api::inode::InodeUrl;
use nsm_api::mechanism::{self as mech, MechanismExt};
use nsm_api::networkservice::NetworkServiceRequest;
use nsm_api::tls::{Identity, TlsError};
use nsm_api::token::{Token, TokenIssuer};
use nsm_api::transport::{Answer, CallError, Dialer, Target};
use tokio::time::Instant;

use crate::netns::{Netns, NetnsError};

/// How long to wait for a netns fd that did not come with the message
/// (grpcfd writes fds before the bytes of the message they belong to, so a
/// missing one is not on its way).
pub const FD_GRACE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum DownstreamError {
    /// Dialling, the deadline, or the next hop's own refusal.
    #[error("next hop {0}")]
    Call(#[from] CallError),
    #[error("next hop {url} returned an unusable connection: {why}")]
    BadAnswer { url: String, why: String },
    #[error("endpoint network namespace {inode}: {source}")]
    EndpointNetns {
        inode: InodeUrl,
        #[source]
        source: NetnsError,
    },
}

/// Our path segment's token, as updatetoken set it.
pub type CallToken = Token;

#[derive(Debug, Clone)]
pub struct NextHop {
    dialer: Dialer,
    tls: Option<Arc<Identity>>,
    /// Signs each call's `nsm-client-token` for the hop it reaches.
    tokens: Arc<TokenIssuer>,
}

/// The next hop's answer, with the connection its fds arrived on.
pub struct Accepted {
    pub conn: Connection,
    fds: FdChannel,
    /// Held until the endpoint's fd has been taken.
    _answer: Answer,
}

impl NextHop {
    pub fn new(
        path: &Path,
        dial_timeout: Duration,
        tls: Option<Arc<Identity>>,
        tokens: Arc<TokenIssuer>,
    ) -> Result<NextHop, TlsError> {
        Ok(NextHop {
            dialer: Dialer::new(Target::Unix(path.to_owned()), dial_timeout)
                .with_tls(tls.as_ref())?,
            tls,
            tokens,
        })
    }

    /// The same client for another socket (a connection recorded with
    /// another next hop).
    pub fn at(&self, path: &Path) -> Result<NextHop, TlsError> {
        NextHop::new(
            path,
            self.dialer.dial_timeout(),
            self.tls.clone(),
            self.tokens.clone(),
        )
    }

    /// The same client for another target (an endpoint discovered in NSM's registry).
    pub fn to(&self, target: Target) -> Result<NextHop, TlsError> {
        Ok(NextHop {
            dialer: Dialer::new(target, self.dialer.dial_timeout()).with_tls(self.tls.as_ref())?,
            tls: self.tls.clone(),
            tokens: self.tokens.clone(),
        })
    }

    /// The dialer of the configured next hop, for other services it serves (nsmgr's registry).
    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    /// Signs our tokens for the next hop.
    pub fn tokens(&self) -> &TokenIssuer {
        &self.tokens
    }

    pub fn url(&self) -> &str {
        self.dialer.url()
    }

    /// Requests `conn` with an empty KERNEL preference (`{LOCAL, KERNEL,
    /// {}}`, as NSM's kernel forwarders ask: the endpoint names its own side).
    pub async fn request(
        &self,
        conn: Connection,
        deadline: Instant,
    ) -> Result<Accepted, DownstreamError> {
        let msg = NetworkServiceRequest {
            connection: Some(conn),
            mechanism_preferences: vec![mech::kernel([])],
        };
        let answer = self.dialer.request(msg, &self.tokens, deadline).await?;
        let fds = answer
            .fds
            .clone()
            .ok_or_else(|| DownstreamError::BadAnswer {
                url: self.url().to_owned(),
                why: "no fd channel (not a unix connection)".into(),
            })?;
        Ok(Accepted {
            conn: answer.conn.clone(),
            fds,
            _answer: answer,
        })
    }

    /// Subscribes to the next hop's MonitorConnections for the connection
    /// whose path segment is `segment` (our own, id and name), as NSM's
    /// monitor client does; the stream ends or fails when the next hop goes.
    pub async fn watch(
        &self,
        segment: PathSegment,
        deadline: Instant,
    ) -> Result<tonic::Streaming<ConnectionEvent>, DownstreamError> {
        let session = self.dialer.dial(deadline).await?;
        let selector = MonitorScopeSelector {
            path_segments: vec![PathSegment {
                id: segment.id,
                name: segment.name,
                ..Default::default()
            }],
            ..Default::default()
        };
        let req = session.signed(selector, &self.tokens)?;
        let url = self.url().to_owned();
        MonitorConnectionClient::new(session.channel())
            .monitor_connections(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| {
                DownstreamError::Call(CallError::Status {
                    target: url,
                    status,
                })
            })
    }

    /// Closes `conn` downstream (a fresh connection too).
    pub async fn close(&self, conn: Connection, timeout: Duration) -> Result<(), DownstreamError> {
        Ok(self
            .dialer
            .close(conn, &self.tokens, Instant::now() + timeout)
            .await?)
    }

    /// The endpoint's KERNEL mechanism (`name`, `inodeURL`) and its netns:
    /// the fd that came with the answer (none: refused).
    pub async fn endpoint_netns(
        &self,
        acc: &Accepted,
    ) -> Result<(Mechanism, Netns), DownstreamError> {
        let bad = |why: String| DownstreamError::BadAnswer {
            url: self.url().to_owned(),
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
