//! The hop's connections: plumbs a connection, refreshes it without
//! changing what is right, replaces it when the endpoint changed its answer,
//! and undoes it — always with the state directory telling a restarted hop
//! what is out there.
//!
//! Concurrency: work on one connection runs one at a time (a lock per
//! connection id); different connections plumb in parallel. What they share
//! (names, records) sits in a [`Registry`] behind a lock held only for map
//! updates, never across kernel work or I/O. Client-side rules take a lock
//! per client namespace, because TPROXY policy routes are shared there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use nsm_api::connection::Connection;

use super::client_proxy::{ClientProxies, Started, client_proxy};
use super::client_routing::{CLIENT_CAPTURE_KEY, MAX_SLOTS, client_capture, policies};
use super::dataplane::{self, Applied};
use super::error::{HopError, Result};
use super::links_cache::LinksCache;
use super::locks::{KeyGuard, KeyedLocks};
use super::record::{HopRecord, Session};
use super::redirect::{BackendName, CLIENT_REDIRECT_KEY, client_redirect, owner_for};
use super::registry::{Held, Registry, tproxy};
use super::state::StateDir;
use super::veth_plan::{Ends, veth_plan};
use crate::link::Links;
use crate::netns::{Netns, NetnsId};

/// Where client proxies are recorded, inside the state directory.
pub const PROXIES_DIR: &str = "proxies";

#[derive(Debug, Clone)]
pub struct HopOptions {
    /// The state directory (created 0700 if missing).
    pub state_dir: PathBuf,
    /// Backend for new rules; recorded per connection.
    pub backend: BackendName,
    /// Proxies this hop may start in a client's namespace, by name.
    pub proxies: Option<crate::proxy::ProxyDefinitions>,
}

/// One connection to plumb.
#[derive(Debug)]
pub struct PlumbRequest<'a> {
    /// The connection's id at this hop (our own path segment's id).
    pub id: &'a str,
    pub client: Netns,
    pub endpoint: Netns,
    /// A netlink handle already open in the client's namespace (e.g. opened
    /// while the next hop was answering); `None`: opened here.
    pub client_links: Option<Links>,
    /// The client's mechanism `name`.
    pub client_if: &'a str,
    /// The endpoint's returned mechanism `name`.
    pub endpoint_if: &'a str,
    /// The endpoint's returned connection (context, extra_context).
    pub connection: &'a Connection,
    pub session: Session,
}

/// What [`Hop::plumb`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlumbOutcome {
    pub record: HopRecord,
    pub applied: Applied,
    /// The connection was already plumbed exactly so (a refresh).
    pub refreshed: bool,
    /// An earlier, different plumbing of this connection was replaced.
    pub replaced: bool,
}

#[derive(Debug)]
pub struct Hop {
    /// The namespace the hop runs in (the node's): never plumbed into.
    own_netns: NetnsId,
    backend: BackendName,
    state: StateDir,
    registry: Mutex<Registry>,
    /// One event per connection id at a time.
    connections: KeyedLocks,
    /// Rules in one client namespace one at a time (shared policy routes).
    namespaces: KeyedLocks,
    /// Netlink handles of the namespaces connections end in.
    links: LinksCache,
    /// Proxies started in clients' namespaces.
    proxies: Option<ClientProxies>,
}

impl Hop {
    /// Opens (and locks) the state directory; connections recorded there
    /// are "adopted": known, undoable, but without descriptors until refreshed.
    pub fn open(opts: &HopOptions) -> Result<Hop> {
        let (state, records) = StateDir::open(&opts.state_dir)?;
        let mut registry = Registry::default();
        for (id, rec) in records {
            registry.adopted.insert(id.clone());
            registry.set(&id, rec);
        }
        Ok(Hop {
            own_netns: Netns::current()?.id(),
            backend: opts.backend,
            state,
            registry: Mutex::new(registry),
            connections: KeyedLocks::default(),
            namespaces: KeyedLocks::default(),
            links: LinksCache::default(),
            proxies: opts
                .proxies
                .clone()
                .map(|d| ClientProxies::new(d, &opts.state_dir.join(PROXIES_DIR)))
                .transpose()?,
        })
    }

    /// The names of the proxies this hop can start in a client's
    /// namespace, comma-separated (empty: none).
    pub fn proxy_names(&self) -> String {
        self.proxies
            .as_ref()
            .map(ClientProxies::names)
            .unwrap_or_default()
    }

    /// Client proxy events by kind (start, restart, upgrade, failure);
    /// `None` without `--proxies`.
    pub fn proxy_events(&self) -> Option<super::client_proxy::ProxyEvents> {
        self.proxies.as_ref().map(ClientProxies::events)
    }

    /// The pids of the proxies running in clients' namespaces.
    pub fn proxy_pids(&self) -> std::collections::HashSet<u32> {
        self.proxies
            .as_ref()
            .map(ClientProxies::pids)
            .unwrap_or_default()
    }

    /// Checks, before anything changes, that proxy `name` can be started.
    fn check_proxy(&self, name: &str, record: &HopRecord) -> Result<()> {
        match &self.proxies {
            Some(p) => p.check(name, record.rules.as_ref()),
            None => Err(HopError::UnknownProxy {
                name: name.to_owned(),
                known: "none".into(),
            }),
        }
    }

    /// Starts connection `id`'s client proxy, if it has one and it is not
    /// running yet (a new connection, or one adopted after a restart).
    async fn ensure_proxy(
        &self,
        id: &str,
        record: &HopRecord,
        client: &Netns,
    ) -> Result<Option<Started>> {
        match (&record.proxy, &self.proxies) {
            (Some(name), Some(p)) => p.start(id, name, client, record).await.map(Some),
            (Some(name), None) => self.check_proxy(name, record).map(|()| None),
            (None, _) => Ok(None),
        }
    }

    /// Takes over the client proxies of connections adopted from an
    /// earlier run: the one still running is adopted (its rules stayed, and
    /// so did it: the pod's traffic never stopped), one that died with a
    /// container is started again, one that runs a definition changed since
    /// is upgraded, and one whose connection is gone is stopped. A client
    /// namespace that is gone is left to the dead-client sweep. Returns the
    /// failures.
    pub async fn start_adopted_proxies(&self) -> Vec<(String, HopError)> {
        let mut failed = Vec::new();
        if let Some(p) = &self.proxies {
            let live = self
                .records()
                .into_iter()
                .filter_map(|(id, r)| Some((id, (r.proxy?, r.proxy_alt))))
                .collect();
            let reaped = p.reap(&live).await;
            if reaped > 0 {
                tracing::info!(
                    proxies = reaped,
                    "stopped the client proxies of connections that ended while we were down"
                );
            }
        }
        for (id, rec) in self.adopted() {
            let Some(name) = rec.proxy.clone() else {
                continue;
            };
            if rec.session.closing {
                continue;
            }
            let _conn = self.connections.lock(&id).await;
            let client = match dataplane::held_or_found(None, &rec.client_netns, rec.client_cookie)
            {
                Ok(Some(ns)) => ns,
                Ok(None) => continue,
                Err(e) => {
                    failed.push((id, e));
                    continue;
                }
            };
            let started = self.ensure_proxy(&id, &rec, &client).await;
            drop(_conn);
            match started {
                Ok(Some(Started::Adopted { stale: false })) => {
                    tracing::info!(%id, proxy = %name, "adopted the connection's running client proxy")
                }
                Ok(Some(Started::Adopted { stale: true })) => {
                    tracing::info!(%id, proxy = %name, "adopted the connection's client proxy, whose definition changed: upgrading it");
                    match self.upgrade_proxy(&id).await {
                        Ok(Some(drain)) => {
                            tokio::spawn(drain);
                        }
                        Ok(None) => {}
                        Err(e) => failed.push((id, e)),
                    }
                }
                Ok(_) => {
                    tracing::info!(%id, proxy = %name, "started the adopted connection's client proxy again")
                }
                Err(e) => failed.push((id, e)),
            }
        }
        failed
    }

    /// Takes new proxy definitions (a reloaded `--proxies` file); returns
    /// the connections whose proxy runs a definition that changed.
    pub fn reload_proxies(&self, defs: crate::proxy::ProxyDefinitions) -> Vec<String> {
        let Some(p) = &self.proxies else {
            return Vec::new();
        };
        let names = self
            .records()
            .into_iter()
            .filter_map(|(id, r)| Some((id, r.proxy?)))
            .collect();
        p.reload(defs, &names)
    }

    /// Upgrades connection `id`'s client proxy to its current definition
    /// without dropping traffic: the new proxy starts on the other ports
    /// (the spec's, or those + [`super::record::UPGRADE_PORT_SHIFT`]) and
    /// must be ready; then the rules switch to it in one transaction (new
    /// connections go there, established ones stay with the old proxy,
    /// whose NAT entries still point at it); then the old one is asked to
    /// stop and drains. Returns the old proxy's drain (to await or not);
    /// a failure leaves the old proxy and rules as they were.
    pub async fn upgrade_proxy(
        &self,
        id: &str,
    ) -> Result<Option<impl std::future::Future<Output = ()> + use<>>> {
        let _conn = self.connections.lock(id).await;
        let (Some(rec), Some(proxies)) = (self.record(id), &self.proxies) else {
            return Ok(None);
        };
        let Some(name) = rec.proxy.clone() else {
            return Ok(None);
        };
        let held = self.registry().held.get(id).cloned();
        let Some(client) = dataplane::held_or_found(
            held.as_ref().map(|h| &h.client),
            &rec.client_netns,
            rec.client_cookie,
        )?
        else {
            return Ok(None);
        };
        let mut next = rec.clone();
        next.proxy_alt = !rec.proxy_alt;
        proxies.check_upgrade(id, &name, &rec, &next)?;
        let new = proxies.launch(id, &name, &client, &next).await?;
        // Recorded first: a crash from here on restarts the proxy on the
        // ports the rules are about to name (or, undone, names already).
        if let Err(e) = self.state.put(id, &next) {
            new.stop().await;
            return Err(e.into());
        }
        let switched = {
            let _ns = self.rules_lock(&next).await;
            dataplane::reapply_rules(&next, Some(&client)).await
        };
        if let Err(e) = switched {
            if let Err(se) = self.state.put(id, &rec) {
                tracing::warn!(%id, error = %se, "cannot record the connection back as it was");
            }
            new.stop().await;
            return Err(e);
        }
        self.registry().set(id, next);
        let old = proxies.swap(id, new);
        tracing::info!(%id, proxy = %name, "client proxy upgraded: new connections go to the new one, the old one drains");
        Ok(Some(async move {
            if let Some(old) = old {
                old.stop().await;
            }
        }))
    }

    /// Stops connection `id`'s client proxy, if one runs (drained first).
    async fn stop_proxy(&self, id: &str) {
        if let Some(p) = &self.proxies {
            p.stop(id).await;
        }
    }

    /// The namespace the hop runs in: never plumbed into.
    pub fn own_netns(&self) -> NetnsId {
        self.own_netns
    }

    /// The state directory.
    pub fn state_path(&self) -> &Path {
        self.state.path()
    }

    pub fn backend(&self) -> BackendName {
        self.backend
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Every critical section leaves the maps consistent or unchanged.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every connection recorded (established, adopted, or being plumbed).
    pub fn records(&self) -> BTreeMap<String, HopRecord> {
        self.registry()
            .records
            .iter()
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect()
    }

    /// How many connections are recorded.
    pub fn len(&self) -> usize {
        self.registry().records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn record(&self, id: &str) -> Option<HopRecord> {
        self.registry().records.get(id).cloned()
    }

    /// Connections recorded by an earlier run and not refreshed since.
    pub fn adopted(&self) -> Vec<(String, HopRecord)> {
        let reg = self.registry();
        let mut out: Vec<_> = reg
            .adopted
            .iter()
            .filter_map(|id| Some((id.clone(), reg.records.get(id)?.clone())))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Recorded by an earlier run, and not refreshed by this one.
    pub fn is_adopted(&self, id: &str) -> bool {
        self.registry().adopted.contains(id)
    }

    /// The connection a caller already has in client namespace
    /// `client_netns` (`inode://dev/ino`): its id here and its record.
    pub fn by_caller(&self, caller_id: &str, client_netns: &str) -> Option<(String, HopRecord)> {
        let reg = self.registry();
        let id = reg.by_caller(caller_id, client_netns)?;
        Some((id.to_owned(), reg.records.get(id)?.clone()))
    }

    /// Rules in a client namespace (whose cleanup removes the TPROXY
    /// policy routes its connections share) one connection at a time.
    async fn rules_lock(&self, rec: &HopRecord) -> Option<KeyGuard<'_>> {
        if dataplane::has_firewall(rec) {
            Some(self.namespaces.lock(&rec.client_netns).await)
        } else {
            None
        }
    }

    /// Plumbs `req` (veth, addresses, routes, client-side rules). Idempotent:
    /// a refresh with the same answer changes nothing that is right and
    /// repairs what is missing. A different answer for a known connection
    /// replaces the old plumbing. A new connection that fails leaves nothing
    /// behind, in either namespace or the state directory.
    pub async fn plumb(&self, req: PlumbRequest<'_>) -> Result<PlumbOutcome> {
        for (end, ns) in [("client", &req.client), ("endpoint", &req.endpoint)] {
            if ns.id() == self.own_netns {
                return Err(HopError::OwnNetns {
                    end,
                    netns: ns.id().to_string(),
                });
            }
        }
        if req.client.id() == req.endpoint.id() {
            return Err(HopError::SameNetns {
                netns: req.client.id().to_string(),
            });
        }
        let cookies = {
            let (c, e) = (dup(&req.client)?, dup(&req.endpoint)?);
            tokio::task::spawn_blocking(move || Ok::<_, HopError>((c.cookie()?, e.cookie()?)))
                .await
                .map_err(|e| HopError::Task(format!("namespace cookie task failed: {e}")))??
        };
        let ends = Ends {
            client_netns: req.client.id(),
            endpoint_netns: req.endpoint.id(),
            client_if: req.client_if,
            endpoint_if: req.endpoint_if,
        };
        let plan = veth_plan(ends, req.connection)?;
        let rules = client_redirect(req.connection)?;
        let capture = client_capture(req.connection)?;
        if rules.is_some() && capture.is_some() {
            return Err(HopError::Ambiguous {
                a: CLIENT_REDIRECT_KEY,
                b: CLIENT_CAPTURE_KEY,
            });
        }
        let proxy = client_proxy(req.connection)?;
        let mut record = HopRecord {
            plan,
            rules,
            capture,
            labels: if proxy.is_some() {
                req.connection.labels.clone().into_iter().collect()
            } else {
                Default::default()
            },
            proxy,
            proxy_alt: false,
            policies: policies(req.connection)?,
            slot: None,
            backend: self.backend,
            owner: owner_for(req.id).as_str().to_owned(),
            client_netns: req.client.id().to_string(),
            endpoint_netns: req.endpoint.id().to_string(),
            client_cookie: Some(cookies.0),
            endpoint_cookie: Some(cookies.1),
            session: req.session,
        };
        if let Some(name) = &record.proxy {
            self.check_proxy(name, &record)?;
        }
        let id = req.id;
        let client_links = match req.client_links {
            Some(l) if l.netns_id() == req.client.id() => l,
            _ => Links::open(&req.client)?,
        };
        let held = Arc::new(Held {
            client: req.client,
            endpoint: self.links.get(&req.endpoint)?,
        });
        let _conn = self.connections.lock(id).await;
        let old = self.record(id);
        if record.needs_slot() {
            // A connection keeps its slot (mark, tables) for as long as it needs one.
            record.slot = old.as_ref().filter(|o| o.needs_slot()).and_then(|o| o.slot);
        }
        // And its proxy the ports an upgrade moved it to (the endpoint
        // does not know them).
        record.proxy_alt = old
            .as_ref()
            .is_some_and(|o| o.proxy_alt && o.proxy == record.proxy && o.rules == record.rules);
        // Its proxy was rendered with the labels it started with.
        if let Some(o) = old.as_ref().filter(|o| o.proxy == record.proxy) {
            record.labels = o.labels.clone();
        }
        let replaced = match old {
            Some(old) if old.same_dataplane(&record) => {
                return self.refresh(id, record, held, &client_links).await;
            }
            Some(old) => {
                self.replace(id, &old, &record).await?;
                true
            }
            None => false,
        };
        let applied = self.fresh(id, &mut record, held, &client_links).await?;
        Ok(PlumbOutcome {
            record,
            applied,
            refreshed: false,
            replaced,
        })
    }

    /// The same dataplane again: verify and repair; a failure keeps the
    /// established connection as it was (NSM's begin).
    async fn refresh(
        &self,
        id: &str,
        record: HopRecord,
        held: Arc<Held>,
        client: &Links,
    ) -> Result<PlumbOutcome> {
        let applied = {
            let _ns = self.rules_lock(&record).await;
            dataplane::apply(&record, client, &held.endpoint, false).await?
        };
        // Adopted after a restart (its proxy died with the old hop), or
        // given up on: started again, or the refresh fails (traffic waits).
        self.ensure_proxy(id, &record, &held.client).await?;
        self.state.put(id, &record)?;
        let mut reg = self.registry();
        reg.set(id, record.clone());
        reg.held.insert(id.to_owned(), held);
        reg.adopted.remove(id);
        Ok(PlumbOutcome {
            record,
            applied,
            refreshed: true,
            replaced: false,
        })
    }

    /// Undoes `old` so `new` can take its place; `new`'s names are reserved
    /// first, so nobody else takes them meanwhile.
    async fn replace(&self, id: &str, old: &HopRecord, new: &HopRecord) -> Result<()> {
        let held = {
            let mut reg = self.registry();
            reg.conflicts(id, new)?;
            reg.index(id, new);
            reg.held.get(id).cloned()
        };
        self.stop_proxy(id).await;
        let _ns = self.rules_lock(old).await;
        let undone = match dataplane::undo(
            old,
            held.as_ref().map(|h| &h.client),
            held.as_ref().map(|h| h.endpoint.netns()),
        )
        .await
        {
            Ok(()) => self.state.remove(id).map_err(HopError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = undone {
            let mut reg = self.registry();
            reg.unindex(id, new);
            reg.set(id, old.clone());
            return Err(e);
        }
        {
            let mut reg = self.registry();
            reg.forget(id);
            // `new`'s names stay reserved for the plumbing that follows.
            reg.index(id, new);
        }
        if dataplane::has_firewall(old) {
            self.restore_neighbours(id, old).await;
        }
        Ok(())
    }

    /// A connection with nothing in the kernel yet: given a slot if it needs
    /// one, recorded first (a crash half-way is still undone later), then
    /// plumbed; on failure everything is taken away again.
    async fn fresh(
        &self,
        id: &str,
        record: &mut HopRecord,
        held: Arc<Held>,
        client: &Links,
    ) -> Result<Applied> {
        {
            let mut reg = self.registry();
            reg.conflicts(id, record)?;
            if record.needs_slot() && record.slot.is_none() {
                let slot = reg
                    .free_slot(id, &record.client_netns, MAX_SLOTS)
                    .ok_or_else(|| HopError::SlotsExhausted {
                        netns: record.client_netns.clone(),
                        max: MAX_SLOTS,
                    })?;
                record.slot = Some(slot);
            }
            reg.set(id, record.clone());
            reg.held.insert(id.to_owned(), held.clone());
        }
        if let Err(e) = self.state.put(id, record) {
            self.registry().forget(id);
            return Err(e.into());
        }
        // The proxy first: ready before any rule sends traffic to it, and
        // the cheapest thing to take back if it never is.
        if let Err(e) = self.ensure_proxy(id, record, &held.client).await {
            if let Err(se) = self.state.remove(id) {
                tracing::warn!(id, error = %se, "cannot forget the failed connection in the state directory");
            }
            self.registry().forget(id);
            return Err(e);
        }
        let _ns = self.rules_lock(record).await;
        match dataplane::apply(record, client, &held.endpoint, true).await {
            Ok(applied) => {
                self.registry().adopted.remove(id);
                Ok(applied)
            }
            Err(e) => {
                self.stop_proxy(id).await;
                if let Err(se) = self.state.remove(id) {
                    tracing::warn!(id, error = %se, "cannot forget the failed connection in the state directory");
                }
                self.registry().forget(id);
                if dataplane::has_firewall(record) {
                    self.restore_neighbours(id, record).await;
                }
                Err(e)
            }
        }
    }

    /// Undoes connection `id` (rules, then the veth) and forgets it.
    /// `Ok(None)`: not known. On failure the record stays, so a later
    /// Close or `--cleanup-on-exit` tries again.
    pub async fn unplumb(&self, id: &str) -> Result<Option<HopRecord>> {
        let _conn = self.connections.lock(id).await;
        let (record, held) = {
            let mut reg = self.registry();
            match reg.records.get(id).cloned() {
                Some(r) => (r, reg.held.get(id).cloned()),
                None => {
                    reg.held.remove(id);
                    return Ok(None);
                }
            }
        };
        // Drained while its rules still send it the pod's traffic.
        self.stop_proxy(id).await;
        let _ns = self.rules_lock(&record).await;
        dataplane::undo(
            &record,
            held.as_ref().map(|h| &h.client),
            held.as_ref().map(|h| h.endpoint.netns()),
        )
        .await?;
        self.state.remove(id)?;
        self.registry().forget(id);
        if dataplane::has_firewall(&record) {
            self.restore_neighbours(id, &record).await;
        }
        Ok(Some(record))
    }

    /// Applies the client-side rules of every connection again where they
    /// drifted (a ruleset flushed in the pod by someone else would let its
    /// traffic pass beside the proxy): fail closed. One connection at a
    /// time, under its lock and its namespace's rules lock, as any change.
    /// Returns the connections repaired.
    pub async fn repair_rules(&self) -> Vec<String> {
        let ids: Vec<String> = self
            .records()
            .into_iter()
            .filter(|(_, r)| dataplane::has_firewall(r) && !r.session.closing)
            .map(|(id, _)| id)
            .collect();
        let mut repaired = Vec::new();
        for id in ids {
            let _conn = self.connections.lock(&id).await;
            // Closed (or replaced) while we waited.
            let Some(rec) = self.record(&id) else {
                continue;
            };
            let _ns = self.rules_lock(&rec).await;
            let held = self.registry().held.get(&id).cloned();
            match dataplane::repair_rules(&rec, held.as_ref().map(|h| &h.client)).await {
                Ok(true) => repaired.push(id),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%id, error = %e, "cannot check or repair the client's rules")
                }
            }
        }
        repaired
    }

    /// Records that connection `id` is being closed but could not be undone
    /// completely, so a restarted hop finishes the job at start.
    pub async fn mark_closing(&self, id: &str) -> Result<()> {
        let _conn = self.connections.lock(id).await;
        let Some(mut rec) = self.record(id) else {
            return Ok(());
        };
        rec.session.closing = true;
        self.state.put(id, &rec)?;
        self.registry().set(id, rec);
        Ok(())
    }

    /// A rules cleanup removes the namespace's TPROXY policy routes, which
    /// other TPROXY connections of the same client namespace share: apply
    /// theirs again. Best effort (logged): the connection at hand is done.
    /// Runs under the namespace's rules lock.
    async fn restore_neighbours(&self, id: &str, gone: &HopRecord) {
        let others: Vec<(String, HopRecord, Option<Arc<Held>>)> = {
            let reg = self.registry();
            reg.neighbours(id, &gone.client_netns)
                .into_iter()
                .filter_map(|other| {
                    let rec = reg.records.get(&other)?.clone();
                    tproxy(&rec)?;
                    let held = reg.held.get(&other).cloned();
                    Some((other, rec, held))
                })
                .collect()
        };
        for (other, rec, held) in others {
            if let Err(e) = dataplane::reapply_rules(&rec, held.as_ref().map(|h| &h.client)).await {
                tracing::warn!(id = %other, error = %e, "cannot restore TPROXY policy routing after a neighbour's cleanup");
            }
        }
    }
}

fn dup(ns: &Netns) -> Result<Netns> {
    ns.try_clone()
        .map_err(|e| HopError::Task(format!("cannot duplicate a namespace descriptor: {e}")))
}
