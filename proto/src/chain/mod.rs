//! NSM's `NetworkServiceServer` chain, as every NSM hop (endpoint, forwarder)
//! runs it: one element per module. Each element gets the request and the
//! rest of the chain ([`Next`]) and decides what to do before and after
//! calling it, exactly like sdk's `next.Server(ctx).Request(ctx, request)`.
//!
//! The chain is generic over the hop's own error type `E`, so each binary
//! keeps one error enum and turns it into gRPC statuses in one place. The
//! generic elements here need only `E: From<ChainError>` (see [`HopError`]);
//! [`ChainError::code`] gives the code NSM uses for each of their errors.

pub mod authorize;
pub mod begin;
pub mod monitor;
pub mod timeout;
pub mod trimpath;
pub mod updatepath;
pub mod updatetoken;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::Code;

use crate::connection::{Connection, Mechanism, Path};
use crate::grpcfd::FdChannel;
use crate::metadata::{self, MetadataError};
use crate::token::TokenError;

/// Errors of the generic elements (and of reading a caller's metadata).
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("connection.id is empty")]
    EmptyConnectionId,
    #[error(transparent)]
    Path(#[from] updatepath::PathError),
    #[error(transparent)]
    Timeout(#[from] timeout::TimeoutError),
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The chain is assembled wrongly (e.g. timeout without begin before it).
    #[error("internal error: {0}")]
    Internal(String),
    /// An authorization policy said no.
    #[error("{0}")]
    Denied(String),
}

impl ChainError {
    /// The gRPC code NSM answers with: the caller's fault is `InvalidArgument`.
    pub fn code(&self) -> Code {
        match self {
            ChainError::Metadata(_)
            | ChainError::EmptyConnectionId
            | ChainError::Path(_)
            | ChainError::Timeout(_) => Code::InvalidArgument,
            ChainError::Token(_) | ChainError::Internal(_) => Code::Internal,
            ChainError::Denied(_) => Code::PermissionDenied,
        }
    }
}

/// What a hop's error type must offer the generic elements: built from a
/// [`ChainError`], printable for logs, and movable across tasks.
pub trait HopError: From<ChainError> + std::fmt::Display + Send + 'static {}

impl<E> HopError for E where E: From<ChainError> + std::fmt::Display + Send + 'static {}

/// A Request after validation: the connection is always present.
#[derive(Debug, Clone, PartialEq)]
pub struct Req {
    pub conn: Connection,
    pub preferences: Vec<Mechanism>,
}

/// The caller's per-RPC token (`nsm-client-token` + `nsm-client-token-expires` metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientToken {
    pub token: String,
    pub expires: SystemTime,
}

/// What an RPC carries beside its message (Go's `context.Context` values).
pub struct Ctx<E> {
    /// The caller's token, copied into the previous path segment.
    pub client_token: Option<ClientToken>,
    /// The caller's deadline (`grpc-timeout`); zero when it sent none.
    pub request_timeout: Duration,
    /// The caller's unix connection, for passing fds (absent over TCP and for our own events).
    pub fds: Option<FdChannel>,
    /// The caller's verified SVID (TLS only): our tokens for it name it.
    pub peer: Option<crate::tls::PeerSvid>,
    /// Set by [`begin`]: lets later elements act on this connection later (e.g. expiry).
    pub events: Option<begin::ConnEvents<E>>,
}

impl<E> Default for Ctx<E> {
    fn default() -> Self {
        Ctx {
            client_token: None,
            request_timeout: Duration::ZERO,
            fds: None,
            peer: None,
            events: None,
        }
    }
}

impl<E> std::fmt::Debug for Ctx<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("client_token", &self.client_token)
            .field("request_timeout", &self.request_timeout)
            .field("fds", &self.fds)
            .field("peer", &self.peer.as_ref().map(|p| &p.id))
            .field("events", &self.events)
            .finish()
    }
}

impl<E> Ctx<E> {
    /// The context of an event the hop starts itself (expiry, reselect): no caller.
    pub fn internal() -> Self {
        Ctx::default()
    }

    /// What the caller of this RPC sent beside the message: its token, its
    /// deadline, and (over unix sockets with grpcfd, with or without TLS)
    /// its fd channel.
    pub fn from_request<T>(request: &tonic::Request<T>) -> Result<Self, ChainError> {
        let peer = crate::transport::Peer::of(request.extensions());
        Ok(Ctx {
            client_token: metadata::client_token(request.metadata())?,
            request_timeout: metadata::request_timeout(request.metadata()),
            fds: peer.fds,
            peer: peer.svid,
            events: None,
        })
    }
}

/// One element of the chain.
#[async_trait::async_trait]
pub trait Element<E>: Send + Sync + 'static {
    async fn request(&self, ctx: &mut Ctx<E>, req: Req, next: Next<E>) -> Result<Connection, E>;
    async fn close(&self, ctx: &mut Ctx<E>, conn: Connection, next: Next<E>) -> Result<(), E>;
}

/// The rest of the chain after an element. Cheap to clone and `'static`, so an
/// element may keep it to act later (begin's expiry close).
pub struct Next<E> {
    elements: Arc<[Arc<dyn Element<E>>]>,
    at: usize,
}

impl<E> Clone for Next<E> {
    fn clone(&self) -> Self {
        Next {
            elements: self.elements.clone(),
            at: self.at,
        }
    }
}

impl<E: 'static> Next<E> {
    /// The whole chain, starting at its first element.
    pub fn chain(elements: Vec<Arc<dyn Element<E>>>) -> Self {
        Next {
            elements: elements.into(),
            at: 0,
        }
    }

    fn split(&self) -> Option<(Arc<dyn Element<E>>, Next<E>)> {
        let e = self.elements.get(self.at)?.clone();
        Some((
            e,
            Next {
                elements: self.elements.clone(),
                at: self.at + 1,
            },
        ))
    }

    /// Runs the rest of the chain; its end returns the connection as it is.
    pub async fn request(&self, ctx: &mut Ctx<E>, req: Req) -> Result<Connection, E> {
        match self.split() {
            Some((e, next)) => e.request(ctx, req, next).await,
            None => Ok(req.conn),
        }
    }

    pub async fn close(&self, ctx: &mut Ctx<E>, conn: Connection) -> Result<(), E> {
        match self.split() {
            Some((e, next)) => e.close(ctx, conn, next).await,
            None => Ok(()),
        }
    }
}

/// `connection.path`, created empty if missing.
pub fn path_mut(conn: &mut Connection) -> &mut Path {
    conn.path.get_or_insert_with(Path::default)
}

#[cfg(test)]
pub(crate) mod testing {
    //! A recording tail element for the unit tests of the other elements.

    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Default)]
    pub struct Recorder {
        pub requests: Mutex<Vec<Req>>,
        pub closes: Mutex<Vec<Connection>>,
        pub fail_requests: AtomicBool,
    }

    #[async_trait::async_trait]
    impl Element<ChainError> for Recorder {
        async fn request(
            &self,
            _: &mut Ctx<ChainError>,
            req: Req,
            next: Next<ChainError>,
        ) -> Result<Connection, ChainError> {
            self.requests.lock().unwrap().push(req.clone());
            if self.fail_requests.load(Ordering::SeqCst) {
                return Err(ChainError::Internal("recorder told to fail".into()));
            }
            next.request(&mut Ctx::internal(), req).await
        }

        async fn close(
            &self,
            _: &mut Ctx<ChainError>,
            conn: Connection,
            next: Next<ChainError>,
        ) -> Result<(), ChainError> {
            self.closes.lock().unwrap().push(conn.clone());
            next.close(&mut Ctx::internal(), conn).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let invalid = [
            ChainError::EmptyConnectionId,
            ChainError::from(MetadataError::NotText("nsm-client-token")),
            ChainError::from(updatepath::PathError::IndexOutOfRange { index: 3, len: 2 }),
            ChainError::from(timeout::TimeoutError::NoPrevious),
        ];
        for e in invalid {
            assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        }
        let e = ChainError::Internal("x".into());
        assert_eq!(
            (e.code(), e.to_string()),
            (Code::Internal, "internal error: x".into())
        );
    }

    #[test]
    fn ctx_from_request_reads_token_and_deadline() {
        let mut r = tonic::Request::new(());
        r.metadata_mut()
            .insert(crate::TOKEN_METADATA, "a.b.c".parse().unwrap());
        r.metadata_mut().insert(
            crate::TOKEN_EXPIRES_METADATA,
            "2033-05-18T03:33:20Z".parse().unwrap(),
        );
        r.metadata_mut()
            .insert("grpc-timeout", "15S".parse().unwrap());
        let ctx = Ctx::<ChainError>::from_request(&r).unwrap();
        assert_eq!(ctx.client_token.unwrap().token, "a.b.c");
        assert_eq!(ctx.request_timeout, Duration::from_secs(15));
        assert!(ctx.fds.is_none());

        let mut r = tonic::Request::new(());
        r.metadata_mut()
            .insert(crate::TOKEN_METADATA, "a.b.c".parse().unwrap());
        let e = Ctx::<ChainError>::from_request(&r).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(
            e.to_string(),
            "metadata nsm-client-token is set without nsm-client-token-expires"
        );
    }
}
