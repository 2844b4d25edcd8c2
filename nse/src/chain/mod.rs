//! The endpoint chain: NSM's `NetworkServiceServer` chain, one element per
//! module. Each element gets the request and the rest of the chain ([`Next`])
//! and decides what to do before and after calling it, exactly like sdk's
//! `next.Server(ctx).Request(ctx, request)`.

pub mod begin;
pub mod functions;
pub mod ipam;
pub mod mechanism;
pub mod monitor;
pub mod timeout;
pub mod trimpath;
pub mod updatepath;
pub mod updatetoken;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nsm_api::connection::{Connection, Mechanism, Path};
use nsm_api::grpcfd::FdChannel;

use crate::error::NseError;

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
#[derive(Debug, Default)]
pub struct Ctx {
    /// The caller's token, copied into the previous path segment.
    pub client_token: Option<ClientToken>,
    /// The caller's deadline (`grpc-timeout`); zero when it sent none.
    pub request_timeout: Duration,
    /// The caller's unix connection, for passing fds (absent over TCP and for our own events).
    pub fds: Option<FdChannel>,
    /// Set by [`begin`]: lets later elements act on this connection later (e.g. expiry).
    pub events: Option<begin::ConnEvents>,
}

impl Ctx {
    /// The context of an event the endpoint starts itself (expiry, reselect): no caller.
    pub fn internal() -> Self {
        Ctx::default()
    }
}

/// One element of the chain.
#[async_trait::async_trait]
pub trait Element: Send + Sync + 'static {
    async fn request(&self, ctx: &mut Ctx, req: Req, next: Next) -> Result<Connection, NseError>;
    async fn close(&self, ctx: &mut Ctx, conn: Connection, next: Next) -> Result<(), NseError>;
}

/// The rest of the chain after an element. Cheap to clone and `'static`, so an
/// element may keep it to act later (begin's expiry close).
#[derive(Clone)]
pub struct Next {
    elements: Arc<[Arc<dyn Element>]>,
    at: usize,
}

impl Next {
    /// The whole chain, starting at its first element.
    pub fn chain(elements: Vec<Arc<dyn Element>>) -> Self {
        Next {
            elements: elements.into(),
            at: 0,
        }
    }

    fn split(&self) -> Option<(Arc<dyn Element>, Next)> {
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
    pub async fn request(&self, ctx: &mut Ctx, req: Req) -> Result<Connection, NseError> {
        match self.split() {
            Some((e, next)) => e.request(ctx, req, next).await,
            None => Ok(req.conn),
        }
    }

    pub async fn close(&self, ctx: &mut Ctx, conn: Connection) -> Result<(), NseError> {
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

    #[derive(Default)]
    pub struct Recorder {
        pub requests: Mutex<Vec<Req>>,
        pub closes: Mutex<Vec<Connection>>,
        pub fail_requests: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Element for Recorder {
        async fn request(&self, _: &mut Ctx, req: Req, next: Next) -> Result<Connection, NseError> {
            self.requests.lock().unwrap().push(req.clone());
            if self.fail_requests.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(NseError::Internal("recorder told to fail".into()));
            }
            next.request(&mut Ctx::internal(), req).await
        }

        async fn close(&self, _: &mut Ctx, conn: Connection, next: Next) -> Result<(), NseError> {
            self.closes.lock().unwrap().push(conn.clone());
            next.close(&mut Ctx::internal(), conn).await
        }
    }
}
