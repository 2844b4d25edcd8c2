//! The forwarder's own chain elements, around NSM's generic ones:
//!
//! ```text
//! updatepath → adopt → begin → updatetoken → timeout → monitor → forward
//! ```
//! * `adopt` (before begin): a Close for a connection a previous run of
//!   this hop plumbed (state file) reaches begin as an unknown id, which
//!   begin ignores; adopt undoes it and closes it downstream instead.
//! * `forward` (last): the forwarder itself ([`Forwarder`]). No trimpath:
//!   a forwarder passes the path on, so the client sees every hop's segment.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nsm_api::chain::{Ctx, Element, Next, Req};
use nsm_api::connection::Connection;
use tokio::time::Instant;

use super::error::ForwardError;
use super::forward::{Forwarder, own_token};

pub struct Adopt {
    forwarder: Arc<Forwarder>,
}

impl Adopt {
    pub fn new(forwarder: Arc<Forwarder>) -> Self {
        Adopt { forwarder }
    }
}

#[async_trait]
impl Element<ForwardError> for Adopt {
    async fn request(
        &self,
        ctx: &mut Ctx<ForwardError>,
        req: Req,
        next: Next<ForwardError>,
    ) -> Result<Connection, ForwardError> {
        next.request(ctx, req).await
    }

    async fn close(
        &self,
        ctx: &mut Ctx<ForwardError>,
        conn: Connection,
        next: Next<ForwardError>,
    ) -> Result<(), ForwardError> {
        if self.forwarder.hop().is_adopted(&conn.id).await {
            tracing::info!(id = %conn.id, "Close of a connection plumbed before a restart");
            return self.forwarder.close_own(&conn.id).await;
        }
        next.close(ctx, conn).await
    }
}

pub struct Forward {
    forwarder: Arc<Forwarder>,
    /// NSM_REQUEST_TIMEOUT: the longest a Request may take downstream.
    request_timeout: Duration,
}

impl Forward {
    pub fn new(forwarder: Arc<Forwarder>, request_timeout: Duration) -> Self {
        Forward {
            forwarder,
            request_timeout,
        }
    }
}

#[async_trait]
impl Element<ForwardError> for Forward {
    async fn request(
        &self,
        ctx: &mut Ctx<ForwardError>,
        req: Req,
        _next: Next<ForwardError>,
    ) -> Result<Connection, ForwardError> {
        // The caller's deadline if it set a shorter one.
        let timeout = match ctx.request_timeout {
            t if t.is_zero() => self.request_timeout,
            t => t.min(self.request_timeout),
        };
        let deadline = Instant::now() + timeout;
        self.forwarder
            .request(ctx.fds.as_ref(), req.conn, &req.preferences, deadline)
            .await
    }

    async fn close(
        &self,
        _ctx: &mut Ctx<ForwardError>,
        conn: Connection,
        _next: Next<ForwardError>,
    ) -> Result<(), ForwardError> {
        let token = own_token(&conn)?;
        let id = conn.id.clone();
        self.forwarder.close(&id, &token, Some(conn)).await
    }
}
