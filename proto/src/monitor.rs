//! A hop's connection monitor (sdk `monitor_connection_server.go`): the
//! current connections as the hop sees them, and every subscriber's stream.
//! A subscriber first gets `INITIAL_STATE_TRANSFER` with the connections its
//! selector matches (even none), then each UPDATE/DELETE that has a matching
//! connection, in order. [`crate::chain::monitor::Monitor`] feeds it from the
//! chain; [`MonitorHub`] itself serves `connection.MonitorConnection`.
//!
//! A subscriber that proved a SPIFFE ID (TLS) sees only the connections
//! whose path it is on — a segment whose token it signed (NSM's
//! `service_connection` policy); without TLS (insecure) every connection.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::connection::monitor_connection_server::MonitorConnection;
use crate::connection::{Connection, ConnectionEvent, ConnectionEventType, MonitorScopeSelector};
use crate::path::selector_matches;

/// Events a subscriber may lag behind before it is dropped (it re-subscribes and gets the state again).
pub const SUBSCRIBER_BUFFER: usize = 1024;

struct Subscriber {
    selector: MonitorScopeSelector,
    /// Its SPIFFE ID; `None`: sees every connection.
    viewer: Option<String>,
    tx: mpsc::Sender<Result<ConnectionEvent, Status>>,
}

/// Whether `viewer` is on `conn`'s path.
fn visible(viewer: Option<&str>, conn: &Connection) -> bool {
    match (viewer, &conn.path) {
        (None, _) => true,
        (Some(v), Some(path)) => crate::authorize::signers(path).any(|s| s == v),
        (Some(_), None) => false,
    }
}

#[derive(Default)]
struct State {
    connections: HashMap<String, Connection>,
    subscribers: Vec<Subscriber>,
    shut_down: bool,
}

/// Checks a subscriber's selector before it subscribes; its `Status` is the
/// answer. The hop supplies it, so statuses stay made by the hop's error type.
pub type SelectorCheck = Arc<dyn Fn(&MonitorScopeSelector) -> Result<(), Status> + Send + Sync>;

/// Cheap to clone: clones share the connections and subscribers.
#[derive(Default, Clone)]
pub struct MonitorHub {
    state: Arc<Mutex<State>>,
    check: Option<SelectorCheck>,
}

fn filtered(
    conns: &HashMap<String, Connection>,
    selector: &MonitorScopeSelector,
    viewer: Option<&str>,
) -> HashMap<String, Connection> {
    conns
        .iter()
        .filter(|(_, c)| selector_matches(selector, c) && visible(viewer, c))
        .map(|(k, c)| (k.clone(), c.clone()))
        .collect()
}

impl MonitorHub {
    pub fn new() -> Self {
        Self::default()
    }

    /// `MonitorConnections` refuses selectors `check` refuses (with its
    /// status). Set it before cloning the hub: clones made earlier keep
    /// the previous check.
    pub fn with_selector_check(
        mut self,
        check: impl Fn(&MonitorScopeSelector) -> Result<(), Status> + Send + Sync + 'static,
    ) -> Self {
        self.check = Some(Arc::new(check));
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records and broadcasts an UPDATE for this connection (keyed by its id).
    pub fn update(&self, conn: &Connection) {
        self.send(ConnectionEventType::Update, conn);
    }

    /// Broadcasts connection `id` as it was last sent, with state DOWN (its
    /// next hop is gone: NSM's clients heal on it). False if unknown.
    pub fn mark_down(&self, id: &str) -> bool {
        let Some(mut conn) = self.lock().connections.get(id).cloned() else {
            return false;
        };
        conn.state = crate::connection::State::Down as i32;
        self.update(&conn);
        true
    }

    /// Forgets connection `id` and broadcasts a DELETE of it as last sent.
    pub fn forget(&self, id: &str) -> bool {
        let Some(conn) = self.lock().connections.get(id).cloned() else {
            return false;
        };
        self.delete(&conn);
        true
    }

    /// Forgets and broadcasts a DELETE for this connection.
    pub fn delete(&self, conn: &Connection) {
        self.send(ConnectionEventType::Delete, conn);
    }

    fn send(&self, kind: ConnectionEventType, conn: &Connection) {
        let mut st = self.lock();
        match kind {
            ConnectionEventType::Update => {
                st.connections.insert(conn.id.clone(), conn.clone());
            }
            ConnectionEventType::Delete => {
                st.connections.remove(&conn.id);
            }
            ConnectionEventType::InitialStateTransfer => return,
        }
        // Sent under the lock, so every subscriber sees events in one order.
        st.subscribers.retain(|sub| {
            if !selector_matches(&sub.selector, conn) || !visible(sub.viewer.as_deref(), conn) {
                return !sub.tx.is_closed();
            }
            let event = ConnectionEvent {
                r#type: kind as i32,
                connections: HashMap::from([(conn.id.clone(), conn.clone())]),
            };
            match sub.tx.try_send(Ok(event)) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!("monitor subscriber lags {SUBSCRIBER_BUFFER} events behind: dropping its stream");
                    false
                }
            }
        });
    }

    /// A new subscription: its first item is the initial state transfer.
    pub fn subscribe(
        &self,
        selector: MonitorScopeSelector,
    ) -> mpsc::Receiver<Result<ConnectionEvent, Status>> {
        self.subscribe_as(selector, None)
    }

    /// A subscription that sees only connections whose path `viewer` (a
    /// SPIFFE ID) is on; `None`: all.
    pub fn subscribe_as(
        &self,
        selector: MonitorScopeSelector,
        viewer: Option<String>,
    ) -> mpsc::Receiver<Result<ConnectionEvent, Status>> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let mut st = self.lock();
        if st.shut_down {
            return rx; // tx dropped: the stream ends at once
        }
        let initial = ConnectionEvent {
            r#type: ConnectionEventType::InitialStateTransfer as i32,
            connections: filtered(&st.connections, &selector, viewer.as_deref()),
        };
        // Cannot fail: fresh channel with room.
        let _ = tx.try_send(Ok(initial));
        st.subscribers.retain(|s| !s.tx.is_closed());
        st.subscribers.push(Subscriber {
            selector,
            viewer,
            tx,
        });
        rx
    }

    /// The connections known now.
    pub fn connections(&self) -> HashMap<String, Connection> {
        self.lock().connections.clone()
    }

    pub fn subscribers(&self) -> usize {
        let mut st = self.lock();
        st.subscribers.retain(|s| !s.tx.is_closed());
        st.subscribers.len()
    }

    /// Ends every stream (graceful shutdown cannot finish while they are open).
    pub fn shutdown(&self) {
        let mut st = self.lock();
        st.shut_down = true;
        st.subscribers.clear();
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ConnectionEvent, Status>> + Send>>;

#[tonic::async_trait]
impl MonitorConnection for MonitorHub {
    type MonitorConnectionsStream = EventStream;

    async fn monitor_connections(
        &self,
        request: Request<MonitorScopeSelector>,
    ) -> Result<Response<Self::MonitorConnectionsStream>, Status> {
        let viewer = crate::transport::Peer::of(request.extensions())
            .svid
            .map(|s| s.id.to_string());
        let selector = request.into_inner();
        crate::limits::check_selector(&selector)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(check) = &self.check {
            check(&selector)?;
        }
        if self.subscribers() >= crate::limits::MAX_MONITOR_SUBSCRIBERS {
            return Err(Status::resource_exhausted(format!(
                "{} MonitorConnections streams are open already, the most this server keeps",
                crate::limits::MAX_MONITOR_SUBSCRIBERS
            )));
        }
        let rx = self.subscribe_as(selector, viewer);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::{Path, PathSegment};

    fn conn(id: &str, fwd: &str, svc: &str) -> Connection {
        Connection {
            id: id.into(),
            network_service: svc.into(),
            path: Some(Path {
                index: 1,
                path_segments: vec![
                    PathSegment {
                        name: "fwd".into(),
                        id: fwd.into(),
                        ..Default::default()
                    },
                    PathSegment {
                        name: "nse".into(),
                        id: id.into(),
                        ..Default::default()
                    },
                ],
            }),
            ..Default::default()
        }
    }

    fn by_fwd(id: &str) -> MonitorScopeSelector {
        MonitorScopeSelector {
            path_segments: vec![PathSegment {
                name: "fwd".into(),
                id: id.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn kind(e: &ConnectionEvent) -> ConnectionEventType {
        ConnectionEventType::try_from(e.r#type).unwrap()
    }

    #[tokio::test]
    async fn initial_transfer_then_matching_events_only() {
        let hub = MonitorHub::new();
        hub.update(&conn("n1", "f1", "s"));
        let mut all = hub.subscribe(MonitorScopeSelector::default());
        let mut f2 = hub.subscribe(by_fwd("f2"));
        let first = all.recv().await.unwrap().unwrap();
        assert_eq!(kind(&first), ConnectionEventType::InitialStateTransfer);
        assert_eq!(first.connections.keys().collect::<Vec<_>>(), ["n1"]);
        let first = f2.recv().await.unwrap().unwrap();
        assert_eq!(kind(&first), ConnectionEventType::InitialStateTransfer);
        assert!(first.connections.is_empty());

        hub.update(&conn("n1", "f1", "s"));
        hub.update(&conn("n2", "f2", "s"));
        hub.delete(&conn("n2", "f2", "s"));
        let e = f2.recv().await.unwrap().unwrap();
        assert_eq!(
            (kind(&e), e.connections.contains_key("n2")),
            (ConnectionEventType::Update, true)
        );
        let e = f2.recv().await.unwrap().unwrap();
        assert_eq!(kind(&e), ConnectionEventType::Delete);
        assert!(f2.try_recv().is_err(), "nothing about n1");
        assert_eq!(hub.connections().len(), 1);
        for want in [
            ConnectionEventType::Update,
            ConnectionEventType::Update,
            ConnectionEventType::Delete,
        ] {
            assert_eq!(kind(&all.recv().await.unwrap().unwrap()), want);
        }
    }

    #[tokio::test]
    async fn closed_and_lagging_subscribers_are_dropped_and_shutdown_ends_streams() {
        let hub = MonitorHub::new();
        drop(hub.subscribe(MonitorScopeSelector::default()));
        let _lagging = hub.subscribe(MonitorScopeSelector::default());
        let mut live = hub.subscribe(MonitorScopeSelector {
            network_services: vec!["other".into()],
            ..Default::default()
        });
        for i in 0..=SUBSCRIBER_BUFFER {
            hub.update(&conn(&format!("n{i}"), "f", "s"));
        }
        assert_eq!(
            hub.subscribers(),
            1,
            "only the non-matching live one is left"
        );
        hub.shutdown();
        assert!(live.recv().await.unwrap().is_ok()); // its initial transfer
        assert!(live.recv().await.is_none(), "stream ended");
    }

    #[tokio::test]
    async fn the_hops_check_refuses_selectors_before_they_subscribe() {
        let hub = MonitorHub::new().with_selector_check(|s| {
            if s.network_services.iter().any(String::is_empty) {
                return Err(Status::invalid_argument("empty network service"));
            }
            Ok(())
        });
        let bad = MonitorScopeSelector {
            network_services: vec![String::new()],
            ..Default::default()
        };
        let Err(e) = hub.monitor_connections(Request::new(bad)).await else {
            panic!("a refused selector subscribed");
        };
        assert_eq!(
            (e.code(), e.message()),
            (tonic::Code::InvalidArgument, "empty network service")
        );
        assert_eq!(hub.subscribers(), 0);
        let _stream = hub
            .monitor_connections(Request::new(MonitorScopeSelector::default()))
            .await
            .expect("an accepted selector");
        assert_eq!(hub.subscribers(), 1);
    }
}
