//! begin (sdk `common/begin`): one event at a time per connection, and the
//! memory of what we last returned.
//!
//! * Requests, Closes and our own events (expiry) for one connection id (our
//!   path segment's id) run one after another, in arrival order.
//! * A successful Request marks the connection UP and stores it; a failed
//!   one keeps the previous state of an established connection.
//! * Close of an unknown (or already closed) id returns Empty and does nothing.
//! * Close always closes with the last connection we returned, not the one passed in.
//! * A Request with `state = RESELECT_REQUESTED` on an established connection
//!   closes the old state first, then is handled as a new Request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{ChainError, Ctx, Element, HopError, Next, Req};
use crate::connection::{Connection, State};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    New,
    Established,
    Closed,
}

struct EntryState {
    phase: Phase,
    /// The connection as we last returned it (at our own index).
    last: Option<Connection>,
}

struct Entry {
    state: tokio::sync::Mutex<EntryState>,
}

#[derive(Default)]
struct Registry {
    conns: Mutex<HashMap<String, Arc<Entry>>>,
}

impl Registry {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Entry>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get_or_insert(&self, id: &str) -> Arc<Entry> {
        self.map()
            .entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(Entry {
                    state: tokio::sync::Mutex::new(EntryState {
                        phase: Phase::New,
                        last: None,
                    }),
                })
            })
            .clone()
    }

    fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.map().get(id).cloned()
    }

    fn is_current(&self, id: &str, entry: &Arc<Entry>) -> bool {
        self.map().get(id).is_some_and(|e| Arc::ptr_eq(e, entry))
    }

    fn remove_if_current(&self, id: &str, entry: &Arc<Entry>) {
        let mut map = self.map();
        if map.get(id).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            map.remove(id);
        }
    }
}

#[derive(Default)]
pub struct Begin {
    registry: Arc<Registry>,
}

impl Begin {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connections known (established, or with an event in progress).
    pub fn connections(&self) -> usize {
        self.registry.map().len()
    }
}

/// A handle on one connection for events the hop starts itself (sdk's `EventFactory`).
pub struct ConnEvents<E> {
    registry: Arc<Registry>,
    id: String,
    entry: Arc<Entry>,
    next: Next<E>,
    /// The connection was established before this event (a refresh, or a Close).
    established: bool,
}

impl<E> Clone for ConnEvents<E> {
    fn clone(&self) -> Self {
        ConnEvents {
            registry: self.registry.clone(),
            id: self.id.clone(),
            entry: self.entry.clone(),
            next: self.next.clone(),
            established: self.established,
        }
    }
}

impl<E> std::fmt::Debug for ConnEvents<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnEvents")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl<E: 'static> ConnEvents<E> {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether the connection was established before this Request (a
    /// refresh): a failure now must leave it as it was, while a new one
    /// must leave nothing.
    pub fn is_refresh(&self) -> bool {
        self.established
    }

    /// Closes the connection through the rest of the chain with its last
    /// returned state, in turn with its other events; does nothing if
    /// `cancelled()` is true by then (e.g. a refresh moved the expiry) or the
    /// connection is no longer established.
    pub async fn close(&self, cancelled: impl Fn() -> bool + Send) -> Result<(), E> {
        let mut st = self.entry.state.lock().await;
        if cancelled()
            || st.phase != Phase::Established
            || !self.registry.is_current(&self.id, &self.entry)
        {
            return Ok(());
        }
        let Some(conn) = st.last.take() else {
            return Ok(());
        };
        let mut ctx = Ctx::internal();
        ctx.events = Some(self.clone());
        let res = self.next.close(&mut ctx, conn).await;
        st.phase = Phase::Closed;
        self.registry.remove_if_current(&self.id, &self.entry);
        res
    }
}

#[async_trait]
impl<E: HopError> Element<E> for Begin {
    async fn request(
        &self,
        ctx: &mut Ctx<E>,
        mut req: Req,
        next: Next<E>,
    ) -> Result<Connection, E> {
        let id = req.conn.id.clone();
        if id.is_empty() {
            return Err(ChainError::EmptyConnectionId.into());
        }
        loop {
            let entry = self.registry.get_or_insert(&id);
            let mut st = entry.state.lock().await;
            if !self.registry.is_current(&id, &entry) {
                // Closed and forgotten while we waited: start over with a fresh entry.
                continue;
            }
            if st.phase == Phase::Established && req.conn.state == State::ReselectRequested as i32 {
                if let Some(old) = st.last.take() {
                    tracing::info!(%id, "RESELECT_REQUESTED: closing the old connection first");
                    let mut close_ctx = Ctx::internal();
                    if let Err(e) = next.close(&mut close_ctx, old).await {
                        tracing::warn!(%id, error = %e, "closing the old connection for reselect failed");
                    }
                }
                st.phase = Phase::Closed;
            }
            // The reselect (if any) is handled: what follows sees an ordinary Request.
            req.conn.state = State::Up as i32;
            ctx.events = Some(ConnEvents {
                registry: self.registry.clone(),
                id: id.clone(),
                entry: entry.clone(),
                next: next.clone(),
                established: st.phase == Phase::Established,
            });
            return match next.request(ctx, req).await {
                Ok(mut conn) => {
                    conn.state = State::Up as i32;
                    st.last = Some(conn.clone());
                    st.phase = Phase::Established;
                    Ok(conn)
                }
                Err(e) => {
                    if st.phase != Phase::Established {
                        st.phase = Phase::Closed;
                        self.registry.remove_if_current(&id, &entry);
                    }
                    Err(e)
                }
            };
        }
    }

    async fn close(&self, ctx: &mut Ctx<E>, conn: Connection, next: Next<E>) -> Result<(), E> {
        let id = conn.id;
        let Some(entry) = self.registry.get(&id) else {
            return Ok(()); // unknown: nothing to close
        };
        let mut st = entry.state.lock().await;
        if st.phase != Phase::Established || !self.registry.is_current(&id, &entry) {
            return Ok(());
        }
        let Some(last) = st.last.take() else {
            return Ok(());
        };
        ctx.events = Some(ConnEvents {
            registry: self.registry.clone(),
            id: id.clone(),
            entry: entry.clone(),
            next: next.clone(),
            established: true,
        });
        let res = next.close(ctx, last).await;
        st.phase = Phase::Closed;
        self.registry.remove_if_current(&id, &entry);
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::testing::Recorder;
    use crate::connectioncontext::ConnectionContext;
    use std::sync::atomic::Ordering;

    type Ctx = super::Ctx<ChainError>;
    type Next = super::Next<ChainError>;

    fn setup() -> (Arc<Begin>, Arc<Recorder>, Next) {
        let begin = Arc::new(Begin::new());
        let rec = Arc::new(Recorder::default());
        let chain = Next::chain(vec![begin.clone(), rec.clone()]);
        (begin, rec, chain)
    }

    fn req(id: &str, label: &str) -> Req {
        Req {
            conn: Connection {
                id: id.into(),
                labels: [("v".to_string(), label.to_string())].into(),
                context: Some(ConnectionContext::default()),
                ..Default::default()
            },
            preferences: vec![],
        }
    }

    #[tokio::test]
    async fn close_uses_the_last_returned_connection() {
        let (begin, rec, chain) = setup();
        chain
            .request(&mut Ctx::internal(), req("a", "1"))
            .await
            .unwrap();
        chain
            .request(&mut Ctx::internal(), req("a", "2"))
            .await
            .unwrap();
        // The Close carries neither labels nor context.
        let bare = Connection {
            id: "a".into(),
            ..Default::default()
        };
        chain.close(&mut Ctx::internal(), bare).await.unwrap();
        let closes = rec.closes.lock().unwrap();
        assert_eq!(closes.len(), 1);
        assert_eq!(closes[0].labels["v"], "2");
        assert!(closes[0].context.is_some());
        assert_eq!(begin.connections(), 0);
    }

    #[tokio::test]
    async fn unknown_and_double_close_do_nothing() {
        let (_, rec, chain) = setup();
        chain
            .close(
                &mut Ctx::internal(),
                Connection {
                    id: "x".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        chain
            .request(&mut Ctx::internal(), req("a", "1"))
            .await
            .unwrap();
        for _ in 0..2 {
            chain
                .close(
                    &mut Ctx::internal(),
                    Connection {
                        id: "a".into(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
        }
        assert_eq!(rec.closes.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn failed_first_request_leaves_nothing_failed_refresh_keeps_state() {
        let (begin, rec, chain) = setup();
        rec.fail_requests.store(true, Ordering::SeqCst);
        assert!(
            chain
                .request(&mut Ctx::internal(), req("a", "1"))
                .await
                .is_err()
        );
        assert_eq!(begin.connections(), 0);

        rec.fail_requests.store(false, Ordering::SeqCst);
        chain
            .request(&mut Ctx::internal(), req("a", "1"))
            .await
            .unwrap();
        rec.fail_requests.store(true, Ordering::SeqCst);
        assert!(
            chain
                .request(&mut Ctx::internal(), req("a", "2"))
                .await
                .is_err()
        );
        assert_eq!(begin.connections(), 1);
        chain
            .close(
                &mut Ctx::internal(),
                Connection {
                    id: "a".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(rec.closes.lock().unwrap()[0].labels["v"], "1");
    }

    #[tokio::test]
    async fn reselect_closes_then_requests() {
        let (_, rec, chain) = setup();
        chain
            .request(&mut Ctx::internal(), req("a", "1"))
            .await
            .unwrap();
        let mut r = req("a", "2");
        r.conn.state = State::ReselectRequested as i32;
        let out = chain.request(&mut Ctx::internal(), r).await.unwrap();
        assert_eq!(out.state, State::Up as i32);
        assert_eq!(rec.closes.lock().unwrap()[0].labels["v"], "1");
        let reqs = rec.requests.lock().unwrap();
        assert_eq!(reqs.len(), 2);
        assert_eq!(
            reqs[1].conn.state,
            State::Up as i32,
            "later elements see a plain Request"
        );
    }

    #[tokio::test]
    async fn empty_id_is_rejected() {
        let (_, _, chain) = setup();
        let e = chain
            .request(&mut Ctx::internal(), req("", "1"))
            .await
            .unwrap_err();
        assert!(matches!(e, ChainError::EmptyConnectionId));
    }

    /// Captures the events handle begin passes down.
    struct Grab(Mutex<Option<ConnEvents<ChainError>>>);

    #[async_trait]
    impl Element<ChainError> for Grab {
        async fn request(
            &self,
            ctx: &mut Ctx,
            req: Req,
            next: Next,
        ) -> Result<Connection, ChainError> {
            *self.0.lock().unwrap() = ctx.events.clone();
            next.request(ctx, req).await
        }
        async fn close(
            &self,
            ctx: &mut Ctx,
            conn: Connection,
            next: Next,
        ) -> Result<(), ChainError> {
            next.close(ctx, conn).await
        }
    }

    #[tokio::test]
    async fn events_close_unless_cancelled() {
        let begin = Arc::new(Begin::new());
        let grab = Arc::new(Grab(Mutex::new(None)));
        let rec = Arc::new(Recorder::default());
        let chain = Next::chain(vec![begin.clone(), grab.clone(), rec.clone()]);
        chain
            .request(&mut Ctx::internal(), req("a", "1"))
            .await
            .unwrap();
        let ev = grab.0.lock().unwrap().clone().unwrap();
        ev.close(|| true).await.unwrap();
        assert_eq!(rec.closes.lock().unwrap().len(), 0);
        ev.close(|| false).await.unwrap();
        ev.close(|| false).await.unwrap();
        assert_eq!(rec.closes.lock().unwrap().len(), 1);
        assert_eq!(begin.connections(), 0);
    }
}
