//! Dead clients. A pod that dies takes its network namespace, and with it
//! the client end of the veth, but nobody Closes its connection: the
//! endpoint would keep its addresses and the hop its record until the
//! token expires. Every [`PERIOD`] the hop lists the namespaces that still
//! exist (names and processes, as NSM's forwarders scan them) and closes
//! each connection whose client namespace is gone: undone here, Closed
//! downstream, and DELETEd on our monitor so the caller learns it.
//!
//! The same task keeps live connections' client-side rules in place:
//! rules someone flushed in the pod are applied again (fail closed); and
//! returns freed memory once many connections have gone.
//!
//! A namespace is matched by inode: should a new namespace get the dead
//! one's inode before the scan, the connection is taken for alive and
//! waits for its expiry instead (never a wrong Close).

use std::sync::Arc;
use std::time::Duration;

use nsm_api::inode::InodeUrl;
use nsm_api::monitor::MonitorHub;

use super::forward::Forwarder;
use crate::netns::{Netns, NetnsId};

/// How often client namespaces are checked.
pub const PERIOD: Duration = Duration::from_secs(2);
/// How often the client-side rules of live connections are verified (a
/// netlink read per connection) and repaired if they drifted.
pub const RULES_PERIOD: Duration = Duration::from_secs(5);

/// Checks every [`PERIOD`] (and the rules every [`RULES_PERIOD`]), for as
/// long as the task runs.
pub async fn watch(forwarder: Arc<Forwarder>, monitor: MonitorHub) {
    let mut last_rules = tokio::time::Instant::now();
    let mut memory = nsm_api::memory::Trim::default();
    loop {
        tokio::time::sleep(PERIOD).await;
        sweep(&forwarder, &monitor).await;
        memory.after(forwarder.hop().len());
        if last_rules.elapsed() >= RULES_PERIOD {
            last_rules = tokio::time::Instant::now();
            for id in forwarder.hop().repair_rules().await {
                tracing::warn!(%id, "the client's rules had drifted (flushed in its namespace?): applied again");
            }
        }
    }
}

/// One check: closes the connections whose client namespace is gone.
pub async fn sweep(forwarder: &Forwarder, monitor: &MonitorHub) -> usize {
    let records = forwarder.hop().records();
    if records.is_empty() {
        return 0;
    }
    // The proxies we run in clients' namespaces do not keep them alive.
    let ours = forwarder.hop().proxy_pids();
    let live = tokio::task::spawn_blocking(move || Netns::live_ids_ignoring(&ours))
        .await
        .unwrap_or_default();
    let mut closed = 0;
    for (id, rec) in records {
        let Ok(url) = rec.client_netns.parse::<InodeUrl>() else {
            continue;
        };
        if rec.session.closing || live.contains(&NetnsId::from(url)) {
            continue;
        }
        tracing::info!(%id, client_netns = %rec.client_netns, client_if = %rec.plan.a.name, "the client's network namespace is gone: closing its connection");
        match forwarder.close_own(&id).await {
            Ok(()) => closed += 1,
            Err(e) => {
                tracing::warn!(%id, error = %e, "closing the dead client's connection failed")
            }
        }
        monitor.forget(&id);
    }
    closed
}
