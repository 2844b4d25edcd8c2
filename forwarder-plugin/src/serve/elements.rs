//! The forwarder's own chain elements, around NSM's generic ones:
//!
//! ```text
//! rejoin → updatepath → adopt → begin → updatetoken → timeout → monitor → forward
//! ```
//! * `rejoin` (before updatepath): a Request whose path ends at its caller
//!   (no segment of ours), from a caller that already has a connection here
//!   in the same client namespace, is that connection again — see [`Rejoin`].
//! * `adopt` (before begin): a Close for a connection a previous run of
//!   this hop plumbed (state directory) reaches begin as an unknown id, which
//!   begin ignores; adopt undoes it and closes it downstream instead.
//! * `forward` (last): the forwarder itself ([`Forwarder`]). No trimpath:
//!   a forwarder passes the path on, so the client sees every hop's segment.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nsm_api::chain::{Ctx, Element, Next, Req};
use nsm_api::connection::{Connection, Mechanism, PathSegment};
use nsm_api::mechanism::MechanismExt;
use tokio::time::Instant;

use super::client_side::client_mechanism;
use super::error::ForwardError;
use super::forward::{Forwarder, decode_downstream, own_token};
use crate::netns::NetnsId;

/// A client that lost what the hop returned and asks again from scratch
/// with its stable id — NSM's init container restarted in the same pod
/// (cmd-nsc-init never Closes, and its ids are `<name>-<i>`) — sends a path
/// that ends at its own segment. updatepath would give that a new id here,
/// making it a second connection that then collides with the first on the
/// interface name. If the caller's id and its network namespace (the
/// mechanism's `inodeURL`) match a connection of this hop, the path that
/// connection was last returned with (our segment and the next hops') is
/// put back after the caller's segment: updatepath reuses our segment's
/// id, begin sees a refresh, and so does the next hop (same segment id,
/// same addresses). Another caller asking for the same interface still
/// gets AlreadyExists.
pub struct Rejoin {
    /// Our path segment's name (updatepath's).
    name: String,
    forwarder: Arc<Forwarder>,
}

impl Rejoin {
    pub fn new(name: impl Into<String>, forwarder: Arc<Forwarder>) -> Self {
        Rejoin {
            name: name.into(),
            forwarder,
        }
    }

    /// The segments to append after the caller's, if `conn` (with
    /// `preferences`: a Request's) rejoins a connection.
    fn lost_tail(&self, conn: &Connection, preferences: &[Mechanism]) -> Option<Vec<PathSegment>> {
        let path = conn.path.as_ref()?;
        let i = path.index as usize;
        // A path with a segment after the caller's is an ordinary refresh
        // (or not ours to mend); a mismatched id is updatepath's to refuse.
        if conn.id.is_empty()
            || path.path_segments.len() != i + 1
            || path.path_segments[i].id != conn.id
        {
            return None;
        }
        let mechanism = client_mechanism(conn, preferences).ok()?;
        let netns = NetnsId::from(mechanism.inode_url().ok()?).to_string();
        let (own_id, record) = self.forwarder.hop().by_caller(&conn.id, &netns)?;
        let last = decode_downstream(&record)
            .and_then(|c| c.path)
            .and_then(|p| p.path_segments.get(p.index as usize..).map(<[_]>::to_vec))
            .filter(|tail| {
                tail.first()
                    .is_some_and(|s| s.id == own_id && s.name == self.name)
            });
        Some(last.unwrap_or_else(|| {
            vec![PathSegment {
                name: self.name.clone(),
                id: own_id,
                ..Default::default()
            }]
        }))
    }
}

#[async_trait]
impl Element<ForwardError> for Rejoin {
    async fn request(
        &self,
        ctx: &mut Ctx<ForwardError>,
        mut req: Req,
        next: Next<ForwardError>,
    ) -> Result<Connection, ForwardError> {
        if let Some(tail) = self.lost_tail(&req.conn, &req.preferences) {
            tracing::info!(
                caller = %req.conn.id,
                id = %tail[0].id,
                "a Request without our path segment from a caller with a connection here: refreshing that connection"
            );
            extend_path(&mut req.conn, tail);
        }
        next.request(ctx, req).await
    }

    /// The same for a Close that names its netns (its `mechanism`): it
    /// closes the caller's connection instead of an unknown id.
    async fn close(
        &self,
        ctx: &mut Ctx<ForwardError>,
        mut conn: Connection,
        next: Next<ForwardError>,
    ) -> Result<(), ForwardError> {
        if let Some(tail) = self.lost_tail(&conn, &[]) {
            tracing::info!(
                caller = %conn.id,
                id = %tail[0].id,
                "a Close without our path segment from a caller with a connection here: closing that connection"
            );
            extend_path(&mut conn, tail);
        }
        next.close(ctx, conn).await
    }
}

fn extend_path(conn: &mut Connection, tail: Vec<PathSegment>) {
    if let Some(path) = conn.path.as_mut() {
        path.path_segments.extend(tail);
    }
}

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
        if self.forwarder.hop().is_adopted(&conn.id) {
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
