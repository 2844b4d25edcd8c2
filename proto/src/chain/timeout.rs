//! timeout (sdk `common/timeout`): a connection nobody refreshes is closed by
//! the hop itself, at the previous hop's `expires` minus the Request's
//! own timeout, so the Close still happens while the caller's token is valid
//! (sdk#1398). Every refresh moves the deadline.
//!
//! sdk checks for the previous segment's `expires` only after the rest of the
//! chain has run; we check first so a refused Request leaves nothing behind.
//! An expiry later than [`MAX_LIFETIME`] from now counts as that.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::{ChainError, Ctx, Element, HopError, Next, Req};
use crate::connection::Connection;
use crate::path::{ConnectionExt, from_timestamp};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeoutError {
    #[error(
        "the endpoint needs the caller's path segment before its own (connection.path.index is 0)"
    )]
    NoPrevious,
    #[error(
        "connection.path.path_segments[{index}] ({name:?}) has no expires: send nsm-client-token and nsm-client-token-expires metadata, or set expires"
    )]
    NoExpires { index: usize, name: String },
    #[error("connection.path.path_segments[{index}].expires is not a valid timestamp")]
    BadExpires { index: usize },
}

struct Timer {
    cancelled: Arc<AtomicBool>,
    /// Dropping it wakes the sleeping timer task, which then ends.
    _stop: oneshot::Sender<()>,
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }
}

#[derive(Default)]
pub struct Timeout {
    timers: Mutex<HashMap<String, Timer>>,
}

/// The previous segment's `expires` (the caller's token expiry).
fn prev_expires(conn: &Connection) -> Result<SystemTime, TimeoutError> {
    let index = conn
        .index()
        .checked_sub(1)
        .ok_or(TimeoutError::NoPrevious)?;
    let prev = conn.prev_segment().ok_or(TimeoutError::NoPrevious)?;
    let ts = prev
        .expires
        .as_ref()
        .ok_or_else(|| TimeoutError::NoExpires {
            index,
            name: prev.name.clone(),
        })?;
    from_timestamp(ts).ok_or(TimeoutError::BadExpires { index })
}

impl Timeout {
    pub fn new() -> Self {
        Self::default()
    }

    /// Timers armed now (one per established connection).
    pub fn armed(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Timer>> {
        self.timers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn arm<E: HopError>(&self, ctx: &Ctx<E>, id: &str, expires: SystemTime) -> Result<(), E> {
        let events = ctx
            .events
            .clone()
            .ok_or_else(|| ChainError::Internal("timeout runs without begin before it".into()))?;
        let delay = expires
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .saturating_sub(ctx.request_timeout);
        let cancelled = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = oneshot::channel::<()>();
        let timer = Timer {
            cancelled: cancelled.clone(),
            _stop: stop,
        };
        // Replacing (and so dropping) the previous timer cancels it.
        self.lock().insert(id.to_owned(), timer);
        let id = id.to_owned();
        tokio::spawn(async move {
            tokio::select! {
                _ = stopped => return,
                _ = tokio::time::sleep(delay) => {}
            }
            tracing::info!(%id, "connection expired without refresh: closing it");
            if let Err(e) = events.close(|| cancelled.load(Ordering::SeqCst)).await {
                tracing::warn!(%id, error = %e, "closing the expired connection failed");
            }
        });
        Ok(())
    }
}

/// The longest a connection nobody refreshes is kept, whatever the caller's
/// token says: a caller cannot make a hop hold its resources longer.
/// (NSM's tokens live minutes; their holders refresh long before.)
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[async_trait]
impl<E: HopError> Element<E> for Timeout {
    async fn request(&self, ctx: &mut Ctx<E>, req: Req, next: Next<E>) -> Result<Connection, E> {
        let expires = prev_expires(&req.conn).map_err(ChainError::from)?;
        let conn = next.request(ctx, req).await?;
        let expires = prev_expires(&conn).unwrap_or(expires);
        let capped = expires.min(SystemTime::now() + MAX_LIFETIME);
        self.arm(ctx, &conn.id, capped)?;
        Ok(conn)
    }

    async fn close(&self, ctx: &mut Ctx<E>, conn: Connection, next: Next<E>) -> Result<(), E> {
        let id = conn.id.clone();
        let res = next.close(ctx, conn).await;
        self.lock().remove(&id);
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::begin::Begin;
    use crate::chain::testing::Recorder;
    use crate::connection::{Path, PathSegment};
    use crate::path::to_timestamp;

    type Ctx = super::Ctx<ChainError>;
    type Next = super::Next<ChainError>;

    fn req(expires_in: Option<Duration>) -> Req {
        Req {
            conn: Connection {
                id: "nse".into(),
                path: Some(Path {
                    index: 1,
                    path_segments: vec![
                        PathSegment {
                            name: "fwd".into(),
                            id: "f".into(),
                            expires: expires_in.map(|d| to_timestamp(SystemTime::now() + d)),
                            ..Default::default()
                        },
                        PathSegment {
                            name: "nse".into(),
                            id: "nse".into(),
                            ..Default::default()
                        },
                    ],
                }),
                ..Default::default()
            },
            preferences: vec![],
        }
    }

    fn setup() -> (Arc<Timeout>, Arc<Recorder>, Next) {
        let t = Arc::new(Timeout::new());
        let rec = Arc::new(Recorder::default());
        (
            t.clone(),
            rec.clone(),
            Next::chain(vec![Arc::new(Begin::new()), t, rec]),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn closes_at_expiry_minus_request_timeout() {
        let (t, rec, chain) = setup();
        let mut ctx = Ctx {
            request_timeout: Duration::from_secs(1),
            ..Default::default()
        };
        chain
            .request(&mut ctx, req(Some(Duration::from_secs(3))))
            .await
            .unwrap();
        assert_eq!(t.armed(), 1);
        tokio::time::sleep(Duration::from_millis(1900)).await;
        assert_eq!(rec.closes.lock().unwrap().len(), 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        tokio::task::yield_now().await;
        assert_eq!(rec.closes.lock().unwrap().len(), 1);
        assert_eq!(t.armed(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_moves_the_deadline_and_close_disarms() {
        let (t, rec, chain) = setup();
        chain
            .request(&mut Ctx::default(), req(Some(Duration::from_secs(2))))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        chain
            .request(&mut Ctx::default(), req(Some(Duration::from_secs(2))))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            rec.closes.lock().unwrap().len(),
            0,
            "the first timer was cancelled"
        );
        chain
            .close(
                &mut Ctx::default(),
                Connection {
                    id: "nse".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!((t.armed(), rec.closes.lock().unwrap().len()), (0, 1));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(rec.closes.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn missing_previous_expires_is_refused_before_anything_runs() {
        let (t, rec, chain) = setup();
        let e = chain
            .request(&mut Ctx::default(), req(None))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("path_segments[0] (\"fwd\") has no expires"),
            "{e}"
        );
        assert_eq!((t.armed(), rec.requests.lock().unwrap().len()), (0, 0));
    }
}
