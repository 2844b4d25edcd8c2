//! The shared proxy of placement proxy (`proxy.process`): one process the
//! endpoint runs for every connection. It outlives an endpoint that ends
//! with connections left (pidfile and log in `NSM_STATE_DIR`, adopted by
//! the next start) and is upgraded without dropping traffic: a changed
//! definition starts on the other slot's ports (the configured ones or
//! those + [`UPGRADE_PORT_SHIFT`]), the table's redirect target moves to
//! it in one transaction once it is ready, and the old process drains —
//! its open connections keep their NAT mapping to it — then stops.
//!
//! Which slot the rules send traffic to is recorded (`<name>.slot`) before
//! they switch, so a restart in the middle adopts the proxy the rules lead
//! to and stops the other.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forwarder_plugin::proxy::{Keep, ProcessSpec, Supervisor, UPGRADE_PORT_SHIFT, kept};

use super::config::ProxyConfig;
use super::process::{self, ProcessConfig};
use crate::own_table::OwnTable;

/// `proxy` with its ports moved to slot `alt` (`None`: they do not fit).
pub fn slot_ports(proxy: &ProxyConfig, alt: bool) -> Option<ProxyConfig> {
    let mut p = proxy.clone();
    if alt {
        p.port.0 = p.port.0.checked_add(UPGRADE_PORT_SHIFT)?;
        p.dns_port.0 = p.dns_port.0.checked_add(UPGRADE_PORT_SHIFT)?;
    }
    Some(p)
}

/// The running proxy and the definition it runs.
struct Current {
    sup: Arc<Supervisor>,
    def: ProcessConfig,
}

pub struct SharedProxy {
    now: Mutex<Current>,
    /// The slot the table's rules send traffic to (its planner reads it).
    alt: Arc<AtomicBool>,
    /// The ports as configured (slot a).
    base: ProxyConfig,
    /// How long a Request waits for the proxy to be ready.
    within: Duration,
    /// Where pidfiles, logs and the slot are kept (`None`: not kept).
    dir: Option<PathBuf>,
    /// `proxy-<table>`: the files' stem.
    name: String,
    /// One upgrade at a time, to the definition asked for last.
    upgrading: tokio::sync::Mutex<()>,
    wanted: Mutex<Option<ProcessConfig>>,
    /// The drain of the proxy the last upgrade replaced, which ran on the
    /// ports the next upgrade moves to.
    draining: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn keep(dir: &Path, name: &str, alt: bool) -> Keep {
    Keep::in_dir(
        dir,
        &if alt {
            format!("{name}-b")
        } else {
            name.into()
        },
    )
}

fn slot_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.slot"))
}

/// The recorded slot (none recorded, or unreadable: the first).
fn read_slot(dir: &Path, name: &str) -> bool {
    std::fs::read_to_string(slot_file(dir, name)).is_ok_and(|s| s.trim() == "b")
}

/// Records slot `alt`, whole or not at all (written aside, renamed).
fn write_slot(dir: &Path, name: &str, alt: bool) -> std::io::Result<()> {
    let path = slot_file(dir, name);
    let tmp = path.with_extension("slot.new");
    std::fs::write(&tmp, if alt { "b\n" } else { "a\n" })?;
    std::fs::rename(&tmp, &path)
}

impl SharedProxy {
    /// Starts (or adopts) `def` on the recorded slot, whose ports `alt` is
    /// set to for the table's planner; a proxy left on the other slot by an
    /// upgrade that a restart interrupted is stopped. Call in a Tokio
    /// runtime, before the table adopts its rules.
    pub fn start(
        def: ProcessConfig,
        base: ProxyConfig,
        state_dir: Option<&Path>,
        table: &str,
        alt: Arc<AtomicBool>,
    ) -> Result<SharedProxy, String> {
        let name = format!("proxy-{table}");
        if let Some(d) = state_dir {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("state directory {}: {e}", d.display()))?;
        }
        let slot = state_dir.is_some_and(|d| read_slot(d, &name));
        let spec = Self::spec(&def, &base, slot)?;
        alt.store(slot, Ordering::SeqCst);
        if let Some(d) = state_dir {
            let other = keep(d, &name, !slot).pidfile;
            let (signal, drain) = (spec.stop_signal, spec.drain_timeout);
            if other.exists() {
                tokio::task::spawn_blocking(move || kept::reap(&other, signal, drain));
            }
        }
        let within = spec.start_timeout;
        let sup = Self::launch(spec, state_dir.map(|d| keep(d, &name, slot)));
        Ok(SharedProxy {
            now: Mutex::new(Current {
                sup: Arc::new(sup),
                def,
            }),
            alt,
            base,
            within,
            dir: state_dir.map(Path::to_owned),
            name,
            upgrading: tokio::sync::Mutex::new(()),
            wanted: Mutex::default(),
            draining: Mutex::default(),
        })
    }

    fn spec(def: &ProcessConfig, base: &ProxyConfig, alt: bool) -> Result<ProcessSpec, String> {
        let ports = slot_ports(base, alt).ok_or_else(|| {
            format!(
                "its ports moved by {UPGRADE_PORT_SHIFT} for an upgrade (from {}) do not fit",
                base.port
            )
        })?;
        process::spec(def, &ports)
    }

    fn launch(spec: ProcessSpec, keep: Option<Keep>) -> Supervisor {
        Supervisor::start_kept(spec, None, keep, Box::new(crate::metrics::proxy_started))
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Current> {
        self.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn supervisor(&self) -> Arc<Supervisor> {
        self.current().sup.clone()
    }

    /// Waits until the proxy is ready (at most its start timeout).
    pub async fn ready(&self) -> Result<u32, forwarder_plugin::proxy::ProxyError> {
        let sup = self.supervisor();
        sup.ready(self.within).await
    }

    /// Once the proxy started or adopted at start is ready: an adopted one
    /// running a definition that changed meanwhile is upgraded to ours.
    pub async fn upgrade_if_stale(&self, own: &Arc<OwnTable>) {
        let sup = self.supervisor();
        if sup.ready(self.within).await.is_err() || sup.adopted() != Some(true) {
            return;
        }
        tracing::info!(pid = ?sup.pid(), "the adopted proxy runs a definition that changed: upgrading it");
        let def = self.current().def.clone();
        self.upgrade(def, own).await;
    }

    /// Runs `def` instead of what runs now, if that differs (or is an
    /// adopted proxy of another definition): the new proxy starts on the
    /// other slot's ports; once it is ready the table sends traffic there
    /// and the old one drains, then stops. If the new one is not ready, or
    /// the table cannot switch, the old one stays in place (logged).
    /// Returns whether it switched.
    pub async fn upgrade(&self, def: ProcessConfig, own: &Arc<OwnTable>) -> bool {
        *self.wanted.lock().unwrap_or_else(|p| p.into_inner()) = Some(def);
        let _one = self.upgrading.lock().await;
        // Asked again meanwhile: the last definition wins, once.
        let Some(def) = self.wanted.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return false;
        };
        let (old_sup, same) = {
            let c = self.current();
            (c.sup.clone(), c.def == def)
        };
        if same && old_sup.adopted() != Some(true) {
            return false;
        }
        // The proxy that last left these ports may still drain there (and
        // answer a readiness check meant for the new one): wait for it.
        let draining = self
            .draining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(d) = draining {
            tracing::info!("waiting for the proxy the last upgrade replaced to drain");
            let _ = d.await;
        }
        let from = self.alt.load(Ordering::SeqCst);
        let in_place = !Self::moves(&def, &self.base);
        // In place: the same slot; else the other.
        let to = if in_place { from } else { !from };
        let spec = match Self::spec(&def, &self.base, to) {
            Ok(s) => s,
            Err(why) => {
                tracing::error!(%why, "cannot upgrade the proxy: the running one stays");
                crate::metrics::proxy_upgraded(false);
                return false;
            }
        };
        if in_place {
            return self.upgrade_in_place(def, spec, old_sup, from).await;
        }
        let port = slot_ports(&self.base, to).map(|p| p.port.0);
        let keep = self.dir.as_deref().map(|d| keep(d, &self.name, to));
        let new = Self::launch(spec, keep);
        if let Err(e) = new.first_ready().await {
            tracing::error!(error = %e, "the upgraded proxy is not ready: the running one stays");
            crate::metrics::proxy_upgraded(false);
            stop(Arc::new(new)).await;
            return false;
        }
        // Recorded before the rules switch: a restart from here on adopts
        // the proxy they lead to.
        self.record_slot(to);
        self.alt.store(to, Ordering::SeqCst);
        if let Err(e) = own.replan().await {
            tracing::error!(error = %e, "cannot move the redirect rules to the upgraded proxy: the running one stays");
            self.alt.store(from, Ordering::SeqCst);
            self.record_slot(from);
            if let Err(e) = own.replan().await {
                tracing::error!(error = %e, "cannot put the redirect rules back either: the next upkeep repairs them");
            }
            crate::metrics::proxy_upgraded(false);
            stop(Arc::new(new)).await;
            return false;
        }
        let new = Arc::new(new);
        {
            let mut c = self.current();
            c.sup = new.clone();
            c.def = def;
        }
        crate::metrics::proxy_upgraded(true);
        tracing::info!(old = ?old_sup.pid(), new = ?new.pid(), port, "proxy upgraded: new connections go to the new proxy, the old one drains");
        // Drains in the background (its stop signal, its drain timeout).
        *self.draining.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(tokio::spawn(stop(old_sup)));
        true
    }

    /// Whether `def` follows the ports it is given (`{{proxyPort}}`,
    /// `{{dnsPort}}`) with its readiness check too
    /// ([`ProcessSpec::runs_beside`]).
    fn moves(def: &ProcessConfig, base: &ProxyConfig) -> bool {
        match (Self::spec(def, base, false), Self::spec(def, base, true)) {
            (Ok(a), Ok(b)) => b.runs_beside(&a),
            _ => false,
        }
    }

    /// The upgrade of a definition with fixed ports: the old process
    /// drains and ends, then the new one starts on the same slot; the
    /// rules stay, so new connections wait (refused, never past the proxy)
    /// meanwhile. A new process that is not ready is retried by its
    /// supervisor, as after a crash.
    async fn upgrade_in_place(
        &self,
        def: ProcessConfig,
        spec: ProcessSpec,
        old: Arc<Supervisor>,
        slot: bool,
    ) -> bool {
        tracing::warn!(
            "proxy.process has fixed ports (neither {{{{proxyPort}}}} nor {{{{dnsPort}}}} used, or a \
             ready port of its own): upgraded in place, new connections wait while it restarts \
             (template its ports and keep the default readiness for an upgrade without a gap)"
        );
        let old_pid = old.pid();
        stop(old).await;
        let keep = self.dir.as_deref().map(|d| keep(d, &self.name, slot));
        let new = Arc::new(Self::launch(spec, keep));
        {
            let mut c = self.current();
            c.sup = new.clone();
            c.def = def;
        }
        match new.first_ready().await {
            Ok(pid) => {
                crate::metrics::proxy_upgraded(true);
                tracing::info!(old = ?old_pid, new = pid, "proxy upgraded in place");
                true
            }
            Err(e) => {
                crate::metrics::proxy_upgraded(false);
                tracing::error!(error = %e, "the upgraded proxy is not ready; its supervisor keeps trying, traffic waits for it");
                false
            }
        }
    }

    fn record_slot(&self, alt: bool) {
        if let Some(d) = &self.dir
            && let Err(e) = write_slot(d, &self.name, alt)
        {
            tracing::warn!(error = %e, dir = %d.display(), "cannot record which proxy the rules lead to; a restart may adopt the other");
        }
    }

    /// At the endpoint's end: with `connections` left the proxy runs on
    /// for them (the next start adopts it), else it is stopped.
    pub fn release(&self, connections: usize) {
        let sup = self.supervisor();
        if connections > 0 && self.dir.is_some() {
            tracing::info!(pid = ?sup.pid(), connections, "leaving the proxy running for the connections left; the next start adopts it");
        } else {
            sup.stop();
        }
    }
}

/// Stops `sup`'s proxy (drained) off the runtime's threads.
async fn stop(sup: Arc<Supervisor>) {
    let _ = tokio::task::spawn_blocking(move || sup.stop()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_other_slot_moves_both_ports_or_does_not_fit() {
        let base = ProxyConfig::default();
        let a = slot_ports(&base, false).unwrap();
        assert_eq!((a.port.0, a.dns_port.0), (15001, 15053));
        let b = slot_ports(&base, true).unwrap();
        assert_eq!((b.port.0, b.dns_port.0), (15101, 15153));
        let mut top = base.clone();
        top.port.0 = u16::MAX - 10;
        assert!(slot_ports(&top, true).is_none());
    }

    #[test]
    fn only_a_definition_that_follows_its_ports_moves_beside_the_old_one() {
        let def = |yaml: &str| -> ProcessConfig { serde_norway::from_str(yaml).unwrap() };
        let base = ProxyConfig::default();
        let templated = def("command: [haproxy]\nenv: {PORT: '{{proxyPort}}'}\n");
        assert!(SharedProxy::moves(&templated, &base));
        let fixed = def("command: [haproxy, -f, /etc/haproxy.cfg]\n");
        assert!(
            !SharedProxy::moves(&fixed, &base),
            "its port stays: in place"
        );
        let own_ready = def(
            "command: [envoy, '{{proxyPort}}']\nready: {httpGet: {port: 15021, path: /ready}}\n",
        );
        assert!(
            !SharedProxy::moves(&own_ready, &base),
            "the old one would answer the new one's readiness check"
        );
    }

    #[test]
    fn the_slot_is_recorded_whole_and_defaults_to_the_first() {
        let dir = std::env::temp_dir().join(format!("nse-slot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(!read_slot(&dir, "proxy-t"), "nothing recorded: the first");
        write_slot(&dir, "proxy-t", true).unwrap();
        assert!(read_slot(&dir, "proxy-t"));
        write_slot(&dir, "proxy-t", false).unwrap();
        assert!(!read_slot(&dir, "proxy-t"));
        assert_eq!(
            keep(&dir, "proxy-t", false).pidfile,
            dir.join("proxy-t.pid")
        );
        assert_eq!(
            keep(&dir, "proxy-t", true).pidfile,
            dir.join("proxy-t-b.pid")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
