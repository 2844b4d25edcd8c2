//! Watching each connection's next hop, as NSM's forwarders do (sdk
//! `monitor` client): a MonitorConnections stream to the endpoint per
//! connection. When it breaks — the endpoint died — the connection is
//! published DOWN on our own monitor, which nsmgr passes to the client, and
//! NSM's client heals (a reselecting Request) as it does for NSM's own
//! endpoints. A Close or a newer Request of the connection stops its watch
//! first, so only an unexpected end counts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use nsm_api::connection::{ConnectionEventType, PathSegment, State};
use nsm_api::monitor::MonitorHub;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::route::Routed;

/// How long subscribing to the endpoint's monitor may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Watches {
    monitor: MonitorHub,
    tasks: Mutex<HashMap<String, AbortHandle>>,
}

impl Watches {
    pub fn new(monitor: MonitorHub) -> Watches {
        Watches {
            monitor,
            tasks: Mutex::default(),
        }
    }

    /// Watches connection `id` (published upstream under that id) through
    /// `next`, where our path segment is `segment`.
    pub fn start(&self, id: String, next: Routed, segment: PathSegment) {
        let monitor = self.monitor.clone();
        let key = id.clone();
        let task = tokio::spawn(async move {
            let deadline = Instant::now() + SUBSCRIBE_TIMEOUT;
            let why = match next.hop.watch(segment.clone(), deadline).await {
                // Not watched (no monitor, too many streams, slow to
                // answer): as NSM's monitor, no verdict on a watch that never
                // started — only a stream that breaks means the endpoint died.
                Err(e) => {
                    tracing::warn!(%id, error = %e, "cannot watch the endpoint: its death will not be noticed before the connection expires");
                    return;
                }
                Ok(mut stream) => loop {
                    match stream.message().await {
                        Ok(Some(ev)) if gone(&ev, &segment) => {
                            break "it reports the connection gone".into();
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break "its monitor stream ended".into(),
                        Err(status) => break format!("its monitor stream failed: {status}"),
                    }
                },
            };
            // `next` (and the endpoint socket fd it may hold) lives until here.
            drop(next);
            if monitor.mark_down(&id) {
                tracing::warn!(%id, why, "the endpoint is gone: connection DOWN (the client heals)");
            }
        });
        let old = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, task.abort_handle());
        if let Some(old) = old {
            old.abort();
        }
    }

    /// Stops watching `id` (Close, or before a new Request of it).
    pub fn stop(&self, id: &str) {
        if let Some(t) = self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
        {
            t.abort();
        }
    }
}

/// A DELETE or DOWN of the connection our segment belongs to.
fn gone(ev: &nsm_api::connection::ConnectionEvent, ours: &PathSegment) -> bool {
    let deleted = ev.r#type == ConnectionEventType::Delete as i32;
    ev.connections.values().any(|c| {
        let mine = c
            .path
            .as_ref()
            .is_some_and(|p| p.path_segments.iter().any(|s| s.id == ours.id));
        mine && (deleted || c.state == State::Down as i32)
    })
}
