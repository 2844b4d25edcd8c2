//! The `--proxies` file, watched: a changed definition upgrades the
//! proxies running from it without dropping their connections (the hop
//! starts the new one on other ports, switches the rules, drains the old
//! one). A file that no longer reads or checks is reported and ignored:
//! the definitions in use stay.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::hop::Hop;
use crate::proxy::ProxyDefinitions;

/// How often the file is read for changes.
pub const PERIOD: Duration = Duration::from_secs(2);

/// Re-reads `path` every [`PERIOD`] for as long as the task runs;
/// `current` is what the hop was started with.
pub async fn watch(hop: Arc<Hop>, path: PathBuf, mut current: ProxyDefinitions) {
    let mut reported = None;
    loop {
        tokio::time::sleep(PERIOD).await;
        let file = path.clone();
        let loaded = tokio::task::spawn_blocking(move || ProxyDefinitions::load(&file)).await;
        let defs = match loaded {
            Ok(Ok(defs)) => defs,
            Ok(Err(e)) => {
                let why = e.to_string();
                if reported.as_ref() != Some(&why) {
                    tracing::error!(error = %why, "the proxies file changed and is not valid: keeping the definitions in use");
                    reported = Some(why);
                }
                continue;
            }
            Err(_) => continue,
        };
        reported = None;
        if defs == current {
            continue;
        }
        tracing::info!(proxies = %defs.names(), "proxies file changed");
        current = defs.clone();
        for id in hop.reload_proxies(defs) {
            match hop.upgrade_proxy(&id).await {
                // The old proxy drains on its own; the next upgrade need not wait.
                Ok(Some(drain)) => {
                    tokio::spawn(drain);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(%id, error = %e, "cannot upgrade the client proxy: the old one keeps serving")
                }
            }
        }
    }
}
