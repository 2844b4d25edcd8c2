//! `--watch`, the sidecar half (cmd-nsc's job): keep every connection alive
//! by re-sending it before the earliest token on its path expires, heal by
//! re-requesting from scratch when a refresh is refused, and Close them all
//! on SIGTERM/SIGINT so the endpoint frees the client's addresses and rules at
//! once instead of at expiry.

use std::time::{Duration, SystemTime};

use nsm_api::connection::Connection;
use nsm_api::path::{ConnectionExt, from_timestamp};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::exit::Failure;
use crate::request::{Backoff, Client, Service};

/// Never refresh more often than this, whatever the path says.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// A third of the time left until the earliest `expires` on the path (NSM
/// refreshes at 0.2–0.4 of it), at least [`MIN_INTERVAL`]. A path without any
/// `expires` is refreshed at a third of our own token lifetime.
pub fn refresh_interval(conn: &Connection, now: SystemTime, fallback: Duration) -> Duration {
    let earliest = conn
        .segments()
        .iter()
        .filter_map(|s| s.expires.as_ref().and_then(from_timestamp))
        .min();
    let left = match earliest {
        Some(t) => t.duration_since(now).unwrap_or_default(),
        None => fallback,
    };
    (left / 3).max(MIN_INTERVAL)
}

/// Resolves once `stop` is set (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// One refresh, healing until it succeeds; `None` if stopped first.
async fn refresh(
    client: &Client,
    svc: &Service,
    last: &Connection,
    stop: &watch::Receiver<bool>,
) -> Option<Connection> {
    let timeout = client.cfg.request_timeout;
    let mut backoff = Backoff::new();
    let mut from_scratch = false;
    loop {
        let base = if from_scratch {
            svc.new_connection()
        } else {
            last.clone()
        };
        let attempt = tokio::select! {
            r = client.request_once(svc, &base, timeout) => r,
            () = stopped(stop.clone()) => return None,
        };
        match attempt {
            Ok(conn) => {
                if from_scratch {
                    tracing::info!(service = %svc.url, id = %conn.id, "re-requested from scratch");
                } else {
                    tracing::debug!(service = %svc.url, id = %conn.id, "refreshed");
                }
                return Some(conn);
            }
            Err(e) => {
                // A definite "no" to the old path (expired, endpoint gone):
                // start over as a new client would.
                if !e.no_answer() {
                    from_scratch = true;
                }
                tracing::warn!(service = %svc.url, error = %e, from_scratch, "refresh failed, retrying");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = stopped(stop.clone()) => return None,
        }
    }
}

/// Refreshes one connection until `stop`; returns the last one we got.
async fn keep(
    client: Client,
    svc: Service,
    mut conn: Connection,
    stop: watch::Receiver<bool>,
) -> (Service, Connection) {
    loop {
        let wait = refresh_interval(&conn, SystemTime::now(), client.cfg.max_token_lifetime);
        tracing::debug!(service = %svc.url, ?wait, "next refresh");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(stop.clone()) => return (svc, conn),
        }
        match refresh(&client, &svc, &conn, &stop).await {
            Some(c) => conn = c,
            None => return (svc, conn),
        }
    }
}

/// SIGTERM/SIGINT handlers, installed before the success lines are printed
/// so a signal sent right after them cannot kill us before we Close.
pub struct Shutdown {
    term: Signal,
    int: Signal,
}

impl Shutdown {
    pub fn install() -> Result<Shutdown, Failure> {
        let mk = |kind, name| {
            signal(kind).map_err(|e| Failure::Setup(format!("cannot handle {name}: {e}")))
        };
        Ok(Shutdown {
            term: mk(SignalKind::terminate(), "SIGTERM")?,
            int: mk(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Watches until SIGTERM/SIGINT, then Closes every connection.
pub async fn run(
    client: Client,
    established: Vec<(Service, Connection)>,
    mut shutdown: Shutdown,
) -> Result<(), Failure> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut keepers = JoinSet::new();
    for (svc, conn) in established {
        keepers.spawn(keep(client.clone(), svc, conn, stop_rx.clone()));
    }
    tracing::info!("watching; SIGTERM or SIGINT closes the connections");
    let sig = shutdown.recv().await;
    tracing::info!("{sig}: closing");
    let _ = stop_tx.send(true);
    let mut closes = JoinSet::new();
    while let Some(done) = keepers.join_next().await {
        let Ok((svc, conn)) = done else { continue };
        let client = client.clone();
        closes.spawn(async move {
            let r = client.close(&conn, client.cfg.request_timeout).await;
            (svc, conn, r)
        });
    }
    while let Some(done) = closes.join_next().await {
        let Ok((svc, conn, r)) = done else { continue };
        match r {
            Ok(()) => tracing::info!(service = %svc.url, id = %conn.id, "closed"),
            // Nothing left to do: the endpoint frees it at expiry.
            Err(e) => tracing::warn!(service = %svc.url, id = %conn.id, error = %e, "close failed"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_api::connection::{Path, PathSegment};
    use nsm_api::path::to_timestamp;

    fn conn_expiring(now: SystemTime, secs: &[u64]) -> Connection {
        Connection {
            path: Some(Path {
                index: 0,
                path_segments: secs
                    .iter()
                    .map(|s| PathSegment {
                        expires: Some(to_timestamp(now + Duration::from_secs(*s))),
                        ..Default::default()
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn interval_is_a_third_of_the_earliest_expiry() {
        let now = SystemTime::now();
        let fallback = Duration::from_secs(600);
        let c = conn_expiring(now, &[600, 30, 90]);
        assert_eq!(refresh_interval(&c, now, fallback), Duration::from_secs(10));
        // Expired or nearly expired paths still wait the minimum.
        let c = conn_expiring(now, &[0]);
        assert_eq!(
            refresh_interval(&c, now + Duration::from_secs(5), fallback),
            MIN_INTERVAL
        );
        // No expiry anywhere: a third of our own lifetime.
        assert_eq!(
            refresh_interval(&Connection::default(), now, fallback),
            Duration::from_secs(200)
        );
    }
}
