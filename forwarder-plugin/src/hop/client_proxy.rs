//! Proxies the hop starts inside a client's namespace (placement sidecar
//! with an injected proxy): the process lives on the node, under our
//! supervision, and its sockets live in the pod, so the pod needs neither
//! a sidecar image nor NET_ADMIN. The endpoint only names a definition
//! (`extra_context[`[`CLIENT_PROXY_KEY`]`]`); what runs is the node
//! agent's own (`forwarder-plugin serve --proxies`), rendered with the
//! connection's values. One proxy per connection, started before the
//! Request returns, stopped (drained) before its rules go. A proxy outlives
//! the node agent, as its rules do: its pid is recorded under
//! `<state dir>/proxies/` and a restarted agent adopts it (no second start,
//! no gap in the pod's traffic).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use nsm_api::connection::Connection;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::error::{HopError, Result};
use super::record::{HopRecord, UPGRADE_PORT_SHIFT, shifted};
use super::state::file_stem;
use crate::netns::Netns;
use crate::proxy::config::{MAX_NAME, Values, fields, valid_name};
use crate::proxy::{Keep, ProcessConfig, ProxyDefinitions, Supervisor, kept};
use crate::rules::{Plan, RedirectSpec};

pub use nsm_api::contract::CLIENT_PROXY_KEY;

/// The proxy the endpoint names for the client, if any (a blank value:
/// none). Only a name's shape is checked here; the hop knows the names.
pub fn client_proxy(conn: &Connection) -> Result<Option<String>> {
    let Some(name) = conn
        .context
        .as_ref()
        .and_then(|c| c.extra_context.get(CLIENT_PROXY_KEY))
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
    else {
        return Ok(None);
    };
    if !valid_name(name) {
        let shown: String = name.chars().take(MAX_NAME + 1).collect();
        return Err(HopError::ProxyRefused {
            name: shown,
            why: format!(
                "extra_context[{CLIENT_PROXY_KEY:?}] is not a proxy name (lowercase letters, digits and '-', at most {MAX_NAME})"
            ),
        });
    }
    Ok(Some(name.to_owned()))
}

/// The node agent's proxy definitions (reloadable) and the proxies
/// running from them.
#[derive(Debug)]
pub struct ClientProxies {
    defs: RwLock<ProxyDefinitions>,
    /// Where running proxies are recorded (pidfiles and logs).
    dir: PathBuf,
    running: Mutex<HashMap<String, Running>>,
    events: ProxyEvents,
}

/// What happened to client proxies: `start` (a connection's first),
/// `restart` (after it died), `upgrade` (a new definition took over),
/// `failure` (not ready: the Request or upgrade failed).
pub type ProxyEvents = Family<EventLabel, Counter>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: &'static str,
}

fn count(events: &ProxyEvents, event: &'static str) {
    events.get_or_create(&EventLabel { event }).inc();
}

/// A connection's proxy and the definition it was started from.
#[derive(Debug)]
pub struct Running {
    sup: Supervisor,
    def: ProcessConfig,
}

/// Most proxy records gone through at a start (they are ours, in a 0700
/// directory, but still bounded).
const MAX_RECORDS: usize = 1 << 16;

/// How [`ClientProxies::start`] found a connection's proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// Running already under us.
    Running,
    /// Started now.
    Fresh,
    /// Adopted from an earlier run of the node agent; `stale`: it runs a
    /// definition that changed since, and wants an upgrade.
    Adopted { stale: bool },
}

/// The pidfile and log of connection `id`'s proxy on its ports (`alt`: the
/// upgrade ports), under `dir`.
fn keep(dir: &Path, id: &str, alt: bool) -> Keep {
    Keep::in_dir(
        dir,
        &format!("{}-{}", file_stem(id), if alt { 'b' } else { 'a' }),
    )
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("pid", &self.pid())
            .finish()
    }
}

impl ClientProxies {
    /// Proxies from `defs`, recorded under `dir` (created 0700).
    pub fn new(defs: ProxyDefinitions, dir: &Path) -> Result<ClientProxies> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| HopError::Task(format!("cannot create {}: {e}", dir.display())))?;
        Ok(ClientProxies {
            defs: RwLock::new(defs),
            dir: dir.to_owned(),
            running: Mutex::default(),
            events: ProxyEvents::default(),
        })
    }

    /// Stops the recorded proxies of connections that are not in `live`
    /// (id → its proxy's ports are the upgrade ones): a connection that
    /// ended, or the old side of an upgrade, while the agent was down.
    /// Each still the recorded process gets SIGTERM, then SIGKILL after
    /// 5 s (its definition is not known any more); returns how many
    /// records were gone through.
    pub async fn reap(&self, live: &HashMap<String, (String, bool)>) -> usize {
        let wanted: HashSet<PathBuf> = live
            .iter()
            .map(|(id, (_, alt))| keep(&self.dir, id, *alt).pidfile)
            .collect();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let orphans: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "pid") && !wanted.contains(p))
            .take(MAX_RECORDS)
            .collect();
        let n = orphans.len();
        let tasks: Vec<_> = orphans
            .into_iter()
            .map(|pidfile| {
                tokio::task::spawn_blocking(move || {
                    kept::reap(
                        &pidfile,
                        nix::sys::signal::Signal::SIGTERM,
                        std::time::Duration::from_secs(5),
                    );
                    let _ = std::fs::remove_file(pidfile.with_extension("log"));
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        n
    }

    /// Starts, restarts, upgrades and failures so far (for metrics).
    pub fn events(&self) -> ProxyEvents {
        self.events.clone()
    }

    fn defs(&self) -> std::sync::RwLockReadGuard<'_, ProxyDefinitions> {
        self.defs.read().unwrap_or_else(|p| p.into_inner())
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The names defined, comma-separated (what the hop announces).
    pub fn names(&self) -> String {
        self.defs().names()
    }

    /// Takes new definitions; returns the connections (of `names`: id →
    /// proxy name) whose proxy runs a definition that changed, to be
    /// upgraded. A connection whose definition was removed keeps its proxy
    /// until it ends.
    pub fn reload(&self, defs: ProxyDefinitions, names: &HashMap<String, String>) -> Vec<String> {
        let mut stale: Vec<String> = self
            .running()
            .iter()
            .filter(|(id, r)| {
                names
                    .get(*id)
                    .and_then(|n| defs.get(n))
                    .is_some_and(|d| r.stale() || *d != r.def)
            })
            .map(|(id, _)| id.clone())
            .collect();
        stale.sort();
        *self.defs.write().unwrap_or_else(|p| p.into_inner()) = defs;
        stale
    }

    /// Whether connection `id`'s proxy is running (or restarting).
    pub fn is_running(&self, id: &str) -> bool {
        self.running().contains_key(id)
    }

    /// The pids of the proxies running now.
    pub fn pids(&self) -> HashSet<u32> {
        self.running()
            .values()
            .filter_map(|r| r.sup.pid())
            .collect()
    }

    /// Checks, before anything changes, that proxy `name` can serve a
    /// connection with the redirect rules `rules`: it is defined, rules send
    /// traffic to it, its own traffic is exempt from them (else every
    /// connection it makes would be sent back to itself), and the ports an
    /// upgrade moves it to are valid too.
    pub fn check(&self, name: &str, rules: Option<&RedirectSpec>) -> Result<()> {
        let defs = self.defs();
        let def = defs.get(name).ok_or_else(|| HopError::UnknownProxy {
            name: name.to_owned(),
            known: known(&defs.names()),
        })?;
        let refused = |why: String| HopError::ProxyRefused {
            name: name.to_owned(),
            why,
        };
        let Some(rules) = rules else {
            return Err(refused(
                "the endpoint asks for it without client redirect rules that send it traffic"
                    .into(),
            ));
        };
        let uid = def.user.unwrap_or(0);
        let gid = def.group.or(def.user).unwrap_or(0);
        if rules.bypass_mark.is_none()
            && !rules.proxy_uids.contains(&uid)
            && !rules.proxy_gids.contains(&gid)
        {
            return Err(refused(format!(
                "it runs as uid {uid} gid {gid}, which the endpoint's redirect rules do not exempt \
                 (proxyUids {:?}, proxyGids {:?}): its own connections would be sent back to it",
                rules.proxy_uids, rules.proxy_gids
            )));
        }
        if shifted(rules).is_none_or(|s| Plan::new(&s).is_err()) {
            return Err(refused(format!(
                "its ports moved by {UPGRADE_PORT_SHIFT} for an upgrade (from {}) are not valid redirect ports",
                rules.outbound_port.0
            )));
        }
        Ok(())
    }

    /// Starts connection `id`'s proxy `name` in `client` (its namespace)
    /// and waits until it is ready; if it is not, nothing of it stays and
    /// the error carries its reason and last output. A proxy already
    /// running for `id` is kept; one an earlier run of ours left running is
    /// adopted.
    pub async fn start(
        &self,
        id: &str,
        name: &str,
        client: &Netns,
        rec: &HopRecord,
    ) -> Result<Started> {
        if self.is_running(id) {
            return Ok(Started::Running);
        }
        let running = self.launch(id, name, client, rec).await?;
        let started = match running.sup.adopted() {
            Some(stale) => Started::Adopted { stale },
            None => {
                count(&self.events, "start");
                Started::Fresh
            }
        };
        self.running().insert(id.to_owned(), running);
        Ok(started)
    }

    /// Starts a proxy for connection `id` as `rec` says (on the ports its
    /// rules send traffic to) and waits until it is ready, beside any that
    /// runs; [`ClientProxies::swap`] puts it in place.
    pub async fn launch(
        &self,
        id: &str,
        name: &str,
        client: &Netns,
        rec: &HopRecord,
    ) -> Result<Running> {
        self.check(name, rec.rules.as_ref())?;
        let def = self.defs().get(name).cloned();
        let (Some(def), Some(rules)) = (def, rec.applied_rules()) else {
            return Err(HopError::Task(
                "checked proxy has no definition or rules".into(),
            ));
        };
        let spec = def
            .spec(&values(id, name, rec, &rules), rules.outbound_port.0)
            .map_err(|why| HopError::ProxyRefused {
                name: name.to_owned(),
                why,
            })?;
        let netns = client
            .try_clone()
            .map_err(|e| HopError::Task(format!("cannot duplicate a namespace descriptor: {e}")))?;
        let (conn_id, proxy, events) = (id.to_owned(), name.to_owned(), self.events.clone());
        let sup = Supervisor::start_kept(
            spec,
            Some(netns),
            Some(keep(&self.dir, id, rec.proxy_alt)),
            Box::new(move |restart| {
                if restart {
                    count(&events, "restart");
                    tracing::warn!(id = %conn_id, proxy = %proxy, "client proxy restarting");
                }
            }),
        );
        match sup.first_ready().await {
            Ok(pid) => {
                tracing::info!(%id, proxy = name, pid, port = rules.outbound_port.0, adopted = sup.adopted().is_some(), "client proxy ready in the client's namespace");
                Ok(Running { sup, def })
            }
            Err(e) => {
                count(&self.events, "failure");
                stop(sup).await;
                Err(HopError::ProxyNotReady {
                    name: name.to_owned(),
                    reason: e.to_string(),
                })
            }
        }
    }

    /// Refuses an upgrade of connection `id`'s proxy `name` from the ports
    /// of `from` to those of `to` that could not tell the new process from
    /// the old one: a definition with fixed ports (neither `{{proxyPort}}`
    /// nor `{{inboundPort}}` nor `{{dnsPort}}` used) or a readiness port of
    /// its own, which the old process would answer. The old one then keeps
    /// serving (the caller logs why).
    pub fn check_upgrade(
        &self,
        id: &str,
        name: &str,
        from: &HopRecord,
        to: &HopRecord,
    ) -> Result<()> {
        let def = self.defs().get(name).cloned();
        let spec = |rec: &HopRecord| {
            let rules = rec.applied_rules()?;
            def.as_ref()?
                .spec(&values(id, name, rec, &rules), rules.outbound_port.0)
                .ok()
        };
        match (spec(from), spec(to)) {
            (Some(a), Some(b)) if b.runs_beside(&a) => Ok(()),
            (Some(_), Some(_)) => Err(HopError::ProxyRefused {
                name: name.to_owned(),
                why: "an upgrade starts the new proxy beside the old one on other ports, but this \
                      definition's ports are fixed (no {{proxyPort}}, {{inboundPort}} or {{dnsPort}}) \
                      or it has a ready port of its own: the old proxy keeps serving"
                    .into(),
            }),
            // Not defined any more, or no rules: `launch` says why.
            _ => Ok(()),
        }
    }

    /// Puts `new` in place of connection `id`'s proxy; returns the old one
    /// (to be drained).
    pub fn swap(&self, id: &str, new: Running) -> Option<Running> {
        count(&self.events, "upgrade");
        self.running().insert(id.to_owned(), new)
    }

    /// Stops connection `id`'s proxy (its stop signal, its drain timeout,
    /// SIGKILL); returns once it is gone. Nothing running: nothing to do.
    pub async fn stop(&self, id: &str) {
        let running = self.running().remove(id);
        if let Some(r) = running {
            r.stop().await;
            tracing::info!(%id, "client proxy stopped");
        }
    }
}

impl Running {
    /// Adopted from an earlier run of ours, running another definition.
    fn stale(&self) -> bool {
        self.sup.adopted() == Some(true)
    }

    /// Stops it and returns once it is gone; blocks meanwhile, so off the
    /// runtime's threads.
    pub async fn stop(self) {
        stop(self.sup).await;
    }
}

async fn stop(sup: Supervisor) {
    let _ = tokio::task::spawn_blocking(move || sup.stop()).await;
}

fn known(names: &str) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.to_owned()
    }
}

/// The template fields of connection `id` ([`fields`]), its labels among
/// them.
fn values(id: &str, name: &str, rec: &HopRecord, rules: &RedirectSpec) -> Values {
    let client_ip = rec
        .plan
        .a
        .addresses
        .first()
        .map(|a| a.addr().to_string())
        .unwrap_or_default();
    let fixed = [
        (fields::CONNECTION_ID, id.to_owned()),
        (fields::INTERFACE, rec.plan.a.name.clone()),
        (fields::PROXY_PORT, rules.outbound_port.0.to_string()),
        (fields::INBOUND_PORT, rules.inbound_port.0.to_string()),
        (fields::DNS_PORT, rules.dns_port.0.to_string()),
        (fields::CLIENT_IP, client_ip),
        (fields::NAME, name.to_owned()),
        (fields::LABELS, String::new()),
    ];
    let labels = rec
        .labels
        .iter()
        .map(|(k, v)| (format!("{}{k}", fields::LABEL_PREFIX), v.clone()));
    fixed
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .chain(labels)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_api::connectioncontext::ConnectionContext;

    fn asking(name: &str) -> Connection {
        Connection {
            context: Some(ConnectionContext {
                extra_context: [(CLIENT_PROXY_KEY.to_owned(), name.to_owned())].into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn proxies() -> ClientProxies {
        ClientProxies::new(
            ProxyDefinitions::parse(
                "version: 1\nproxies:\n  haproxy: {command: [haproxy], user: 1337}\n  rooted: {command: [x]}\n",
            )
            .unwrap(),
            &std::env::temp_dir().join(format!("client-proxy-{}", std::process::id())),
        )
        .unwrap()
    }

    #[test]
    fn an_upgrade_needs_a_definition_that_follows_its_ports() {
        let p = ClientProxies::new(
            ProxyDefinitions::parse(
                "version: 1\nproxies:\n  moves: {command: [haproxy], env: {P: '{{proxyPort}}'}, user: 1337}\n  fixed: {command: [haproxy], user: 1337}\n  ownready: {command: [envoy, '{{proxyPort}}'], user: 1337, ready: {tcpPort: 15021}}\n",
            )
            .unwrap(),
            &std::env::temp_dir().join(format!("client-proxy-up-{}", std::process::id())),
        )
        .unwrap();
        let from = crate::hop::state::tests::record();
        let mut to = from.clone();
        to.proxy_alt = true;
        p.check_upgrade("c", "moves", &from, &to).unwrap();
        for name in ["fixed", "ownready"] {
            let e = p.check_upgrade("c", name, &from, &to).unwrap_err();
            assert!(
                e.to_string().contains("the old proxy keeps serving"),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn the_endpoint_names_a_proxy_by_a_checked_name() {
        assert_eq!(client_proxy(&Connection::default()).unwrap(), None);
        assert_eq!(client_proxy(&asking(" ")).unwrap(), None);
        assert_eq!(
            client_proxy(&asking("haproxy")).unwrap().as_deref(),
            Some("haproxy")
        );
        for bad in ["/bin/sh -c x", "HAProxy", &"a".repeat(10_000)] {
            let e = client_proxy(&asking(bad)).unwrap_err();
            assert!(e.to_string().contains("is not a proxy name"), "{e}");
            assert!(e.to_string().len() < 400, "the name is cut: {e}");
        }
    }

    #[test]
    fn a_proxy_must_be_defined_fed_by_rules_and_exempt_from_them() {
        let p = proxies();
        let spec = RedirectSpec::default();
        p.check("haproxy", Some(&spec)).unwrap();
        let e = p.check("envoy", Some(&spec)).unwrap_err();
        assert!(
            matches!(&e, HopError::UnknownProxy { known, .. } if known == "haproxy,rooted"),
            "{e}"
        );
        let e = p.check("haproxy", None).unwrap_err();
        assert!(
            e.to_string().contains("without client redirect rules"),
            "{e}"
        );
        let e = p.check("rooted", Some(&spec)).unwrap_err();
        assert!(e.to_string().contains("uid 0 gid 0"), "{e}");
        assert!(e.to_string().contains("sent back to it"), "{e}");
        let none = ClientProxies::new(
            ProxyDefinitions::default(),
            &std::env::temp_dir().join(format!("client-proxy-{}", std::process::id())),
        )
        .unwrap();
        let e = none.check("haproxy", Some(&spec)).unwrap_err();
        assert!(e.to_string().contains("defines none"), "{e}");
    }
}
