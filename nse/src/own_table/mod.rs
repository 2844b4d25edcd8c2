//! A table a network function owns in the NSE's own netns (mesh-proxy's
//! redirect rules, a firewall's filter): its rules depend on the function's
//! configuration alone (and on whether some connection has IPv6 addresses,
//! [`Planner`]); the live connections' interfaces are the members of its
//! interface set (`Plan::for_interfaces`). So a Request adds
//! one member and a Close removes one, a set-element transaction that
//! rewrites no rule ([`Backend::update_interfaces`]; with nft microseconds
//! of kernel time, on a netlink socket kept open because closing one after
//! a deletion waits ~10 ms for an RCU grace period); only the first
//! connection, and the first with IPv6, write the rules.
//!
//! The table stays when the last connection leaves: its empty set captures
//! nothing, and the next connection is again one element away (deleting and
//! re-creating the table, hooks and all, costs ~1 ms per round). It is
//! removed when the NSE stops with no connection left ([`OwnRules::release`]).
//! With a state file ([`state`]) a restarted NSE adopts the
//! connections recorded there whose interfaces still exist
//! ([`OwnRules::adopt`]): their traffic keeps going to the proxy through the
//! restart; those never heard of again leave the set once their interface is
//! gone. Without one, start-up removes the table (clients get their rules
//! back with their next refresh). IPv6 capture, once some
//! connection needed it, stays while the table does (it is restricted to
//! the set's interfaces like IPv4).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use forwarder_plugin::netns::{Netns, NetnsError};
use forwarder_plugin::rules::{self, Backend, BackendOptions, Outcome, Plan, RulesError};

pub mod state;

use forwarder_plugin::rules::{BackendKind, Owner, SpecError};
use state::StateFile;

/// A function's rules for the given interface-set members, capturing IPv6
/// too when asked: the same rules whatever the members.
pub type Planner = Box<dyn Fn(Vec<String>, bool) -> Result<Plan, SpecError> + Send + Sync>;

/// What the table needs of one connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Live {
    /// The NSE-side interface (the KERNEL mechanism's `name`).
    pub interface: String,
    /// The connection has IPv6 addresses, so IPv6 is captured too.
    pub ipv6: bool,
    /// Its addresses (`src_ip_addrs`, `dst_ip_addrs`), so that after a
    /// restart IPAM gives them back to it, not to a new connection.
    #[serde(default)]
    pub src: Vec<String>,
    #[serde(default)]
    pub dst: Vec<String>,
}

pub struct OwnTable {
    owner: Owner,
    planner: Planner,
    netns: Netns,
    backend: Box<dyn Backend>,
    state: Mutex<State>,
    /// Where the live connections are recorded (none: not kept).
    file: Option<StateFile>,
}

#[derive(Default)]
struct State {
    /// Connection id → what it needs; the set's members are their interfaces.
    live: BTreeMap<String, Live>,
    /// The rules the kernel holds (a plan whose members do not matter),
    /// `None` when unknown — nothing applied yet, or a failure that could
    /// not be undone: the next change then applies everything.
    applied: Option<Plan>,
    /// Connections adopted at start and not heard of since: they leave
    /// when their interface is gone ([`OwnRules::prune_adopted`]).
    adopted: BTreeSet<String>,
}

impl State {
    /// The interfaces of the live connections, but `except`'s.
    fn members(&self, except: Option<&str>) -> BTreeSet<String> {
        self.live
            .iter()
            .filter(|(id, _)| Some(id.as_str()) != except)
            .map(|(_, l)| l.interface.clone())
            .collect()
    }

    /// Whether a live connection other than `id` uses `interface`.
    fn shared(&self, id: &str, interface: &str) -> bool {
        self.live
            .iter()
            .any(|(other, l)| other != id && l.interface == interface)
    }

    /// Whether the rules capture IPv6: once some connection needed it, for
    /// as long as the rules stay.
    fn ipv6(&self) -> bool {
        self.applied.as_ref().is_some_and(|p| p.ipv6) || self.live.values().any(|l| l.ipv6)
    }
}

impl OwnTable {
    /// For the calling thread's netns (the process never leaves its own).
    pub fn new(
        backend: BackendKind,
        owner: Owner,
        planner: Planner,
    ) -> Result<OwnTable, NetnsError> {
        let backend = rules::get_backend(
            backend,
            BackendOptions {
                owner: owner.clone(),
                // Our own namespace, for as long as we run: one socket, so
                // a Close's element deletion does not wait for the kernel.
                keep_socket: true,
                ..Default::default()
            },
        );
        Ok(OwnTable {
            owner,
            planner,
            netns: Netns::current()?,
            backend,
            state: Mutex::new(State::default()),
            file: None,
        })
    }

    /// Records the live connections in `file` from now on.
    pub fn with_state(mut self, file: StateFile) -> OwnTable {
        self.file = Some(file);
        self
    }

    /// Records `live`; an error is logged: the kernel is what counts, and
    /// the record is rewritten with the next change.
    fn record(&self, live: &BTreeMap<String, Live>) {
        if let Some(f) = &self.file
            && let Err(e) = f.save(live)
        {
            tracing::error!(error = %e, "cannot record the live connections; a restart may not adopt them");
        }
    }

    /// Start-up: takes over the connections recorded by a previous run whose
    /// interfaces still exist, and makes the table hold exactly them (none:
    /// removes the table). Returns how many were adopted.
    pub fn adopt(&self) -> Result<usize, RulesError> {
        let recorded = match &self.file {
            None => BTreeMap::new(),
            Some(f) => match f.load() {
                Ok((conns, why)) => {
                    if let Some(why) = why {
                        tracing::warn!(state = %f.path().display(), why, "not adopting a state file");
                    }
                    conns
                }
                Err(e) => {
                    // Unknown: keep the kernel's table as it is (fail closed);
                    // the first change writes what is live.
                    tracing::error!(error = %e, "cannot read the state file: the table is kept as it is");
                    return Ok(0);
                }
            },
        };
        let live: BTreeMap<String, Live> = recorded
            .into_iter()
            .filter(|(_, l)| crate::netns::has_link(&l.interface))
            .collect();
        let mut st = self.lock();
        if live.is_empty() {
            self.backend.cleanup(&self.netns)?;
            *st = State::default();
            self.record(&live);
            return Ok(0);
        }
        let ipv6 = live.values().any(|l| l.ipv6);
        let plan = self.plan(live.values().map(|l| l.interface.clone()), ipv6)?;
        self.write(&plan)?;
        st.adopted = live.keys().cloned().collect();
        st.applied = Some(self.plan([], ipv6)?);
        st.live = live;
        self.record(&st.live);
        Ok(st.live.len())
    }

    /// Makes the kernel hold the table the live connections need again if it
    /// drifted (a ruleset flushed behind our back): a read when it did not.
    /// Nothing live: nothing to keep.
    pub fn reconcile(&self) -> Result<(), RulesError> {
        let mut st = self.lock();
        if st.live.is_empty() {
            return Ok(());
        }
        self.refresh(&mut st)
    }

    /// The adopted connections not heard of since, with their addresses
    /// (id, `src_ip_addrs`, `dst_ip_addrs`), which IPAM must keep for them.
    pub fn adopted(&self) -> Vec<(String, Vec<String>, Vec<String>)> {
        let st = self.lock();
        st.adopted
            .iter()
            .filter_map(|id| {
                st.live
                    .get(id)
                    .map(|l| (id.clone(), l.src.clone(), l.dst.clone()))
            })
            .collect()
    }

    /// Drops adopted connections whose interface is gone (their client
    /// left while we were away). Returns their ids and how many are still
    /// adopted.
    pub fn prune_adopted(&self) -> (Vec<String>, usize) {
        let gone: Vec<(String, Live)> = {
            let st = self.lock();
            st.adopted
                .iter()
                .filter_map(|id| st.live.get(id).map(|l| (id.clone(), l.clone())))
                .filter(|(_, l)| !crate::netns::has_link(&l.interface))
                .collect()
        };
        let mut dropped = Vec::new();
        for (id, _) in gone {
            match self.update(&id, None) {
                Ok(()) => dropped.push(id),
                Err(e) => {
                    tracing::warn!(%id, error = %e, "cannot drop an adopted connection whose interface is gone")
                }
            }
        }
        (dropped, self.lock().adopted.len())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state matching the kernel or unchanged.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn plan(
        &self,
        members: impl IntoIterator<Item = String>,
        ipv6: bool,
    ) -> Result<Plan, RulesError> {
        Ok((self.planner)(members.into_iter().collect(), ipv6)?)
    }

    /// Makes the kernel hold `plan` (all of it, members included).
    fn write(&self, plan: &Plan) -> Result<(), RulesError> {
        self.backend.apply(&self.netns, plan).map(|_| ())
    }

    /// Sets connection `id`'s entry (`None`: removes it) and makes the
    /// kernel match. All or nothing: on error the previous state is
    /// restored in the kernel (best effort) and kept here. A new entry
    /// adds its interface to the set (the rules are written only when
    /// they are missing or must change); a removed one takes its interface
    /// out; an unchanged entry (a refresh) verifies the table and repairs
    /// it if it drifted. Removing an unknown id touches nothing.
    pub fn update(&self, id: &str, entry: Option<Live>) -> Result<(), RulesError> {
        let mut st = self.lock();
        st.adopted.remove(id);
        let old = st.live.get(id).cloned();
        let (add, remove, ipv6) = match (&entry, &old) {
            (None, None) => return Ok(()),
            (Some(new), Some(old)) if new == old => return self.refresh(&mut st),
            (Some(new), _) => {
                let add = if st.shared(id, &new.interface) {
                    Vec::new()
                } else {
                    vec![new.interface.clone()]
                };
                let remove = old
                    .filter(|o| o.interface != new.interface && !st.shared(id, &o.interface))
                    .map(|o| vec![o.interface])
                    .unwrap_or_default();
                (add, remove, st.ipv6() || new.ipv6)
            }
            (None, Some(old)) => {
                let remove = if st.shared(id, &old.interface) {
                    Vec::new()
                } else {
                    vec![old.interface.clone()]
                };
                (Vec::new(), remove, st.ipv6())
            }
        };
        // Recorded before an interface joins (a crash then leaves an entry
        // too many, still captured), and after one leaves (below).
        if let Some(e) = &entry {
            let mut next = st.live.clone();
            next.insert(id.to_owned(), e.clone());
            self.record(&next);
        }
        // The rules alone (no member): what decides between a membership
        // change and a full apply, without work per open connection.
        let rules_only = self.plan([], ipv6)?;
        let whole = || {
            let mut next = st.members(Some(id));
            next.extend(entry.as_ref().map(|e| e.interface.clone()));
            self.plan(next, ipv6).and_then(|p| self.write(&p))
        };
        let started = std::time::Instant::now();
        let written = match &st.applied {
            // The rules are there: only the members change.
            Some(applied) if applied.same_rules(&rules_only) => self
                .backend
                .update_interfaces(&self.netns, &rules_only, &add, &remove)
                .or_else(|e| {
                    // E.g. the table was deleted by hand: write it whole.
                    tracing::warn!(error = %e, "interface set change failed; re-applying the whole table");
                    whole()
                }),
            _ => whole(),
        };
        crate::metrics::rules_applied(self.backend.name(), started.elapsed());
        if let Err(e) = written {
            self.restore(&mut st);
            self.record(&st.live);
            return Err(e);
        }
        let removed = entry.is_none();
        match entry {
            Some(e) => st.live.insert(id.to_owned(), e),
            None => st.live.remove(id),
        };
        st.applied = Some(rules_only);
        // An added entry was recorded before it joined.
        if removed {
            self.record(&st.live);
        }
        Ok(())
    }

    /// A refresh: apply the whole plan, which is a read when the kernel
    /// matches it (set members included) and a repair when it drifted.
    fn refresh(&self, st: &mut State) -> Result<(), RulesError> {
        let plan = self.plan(st.members(None), st.ipv6())?;
        let started = std::time::Instant::now();
        let applied = self.backend.apply(&self.netns, &plan);
        crate::metrics::rules_applied(self.backend.name(), started.elapsed());
        match applied {
            Ok(Outcome::Applied) if st.applied.is_some() => {
                tracing::warn!(table = %self.table(), "repaired the redirect rules, which had drifted");
            }
            Ok(_) => {}
            Err(e) => {
                self.restore(st);
                return Err(e);
            }
        }
        st.applied = Some(plan);
        Ok(())
    }

    /// After a failed change: puts the kernel back as `st` says it was (the
    /// backends apply atomically, but a rollback of theirs may have removed
    /// the whole table). Forgets what is applied if that fails too.
    fn restore(&self, st: &mut State) {
        let restored = match &st.applied {
            None if st.live.is_empty() => self.backend.cleanup(&self.netns),
            None => self
                .plan(st.members(None), st.ipv6())
                .and_then(|p| self.write(&p)),
            Some(applied) => self
                .plan(st.members(None), applied.ipv6)
                .and_then(|p| self.write(&p)),
        };
        if let Err(e) = restored {
            tracing::error!(error = %e, "cannot restore the previous redirect rules");
            st.applied = None;
        }
    }

    /// Removes the table whatever is live (start-up: after a restart no
    /// connection is known until clients refresh).
    pub fn cleanup(&self) -> Result<(), RulesError> {
        let mut st = self.lock();
        self.backend.cleanup(&self.netns)?;
        *st = State::default();
        self.record(&st.live);
        Ok(())
    }

    /// At exit: removes the table if no connection is live (it captures
    /// nothing then). Live connections keep their rules, and so their path
    /// through the proxy, until a restarted NSE cleans up at start.
    pub fn release(&self) -> Result<(), RulesError> {
        let mut st = self.lock();
        if !st.live.is_empty() {
            return Ok(());
        }
        self.backend.cleanup(&self.netns)?;
        st.applied = None;
        Ok(())
    }

    /// The interfaces whose traffic is captured now.
    pub fn interfaces(&self) -> Vec<String> {
        self.lock().members(None).into_iter().collect()
    }

    /// [`OwnTable::update`] off the async runtime (netlink and iptables
    /// block); the error names the table.
    pub async fn set(self: &Arc<Self>, id: &str, entry: Option<Live>) -> Result<(), String> {
        let table = self.clone();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || table.update(&id, entry))
            .await
            .map_err(|e| format!("rules task failed: {e}"))?
            .map_err(|e| format!("{} in the endpoint's netns: {e}", self.table()))
    }

    /// Upkeep off the async runtime: lets adopted connections whose
    /// interface is gone go ([`OwnTable::prune_adopted`], their ids are
    /// returned) and repairs drift ([`OwnTable::reconcile`]: fail closed).
    pub async fn upkeep(self: &Arc<Self>) -> Vec<String> {
        let table = self.clone();
        let res = tokio::task::spawn_blocking(move || {
            let (gone, _) = table.prune_adopted();
            (gone, table.reconcile())
        })
        .await;
        match res {
            Ok((gone, Ok(()))) => gone,
            Ok((gone, Err(e))) => {
                tracing::warn!(table = %self.table(), error = %e, "cannot restore the rules");
                gone
            }
            Err(_) => Vec::new(),
        }
    }

    /// Writes the whole table again from the planner, whose rules changed
    /// (the shared proxy moved to other ports): one transaction, so
    /// traffic goes to the old target or the new one, never past both.
    /// Nothing written yet: nothing to do, the next change writes it.
    pub fn rewrite(&self) -> Result<(), RulesError> {
        let mut st = self.lock();
        if st.applied.is_none() && st.live.is_empty() {
            return Ok(());
        }
        let ipv6 = st.ipv6();
        let plan = self.plan(st.members(None), ipv6)?;
        let started = std::time::Instant::now();
        let written = self.write(&plan);
        crate::metrics::rules_applied(self.backend.name(), started.elapsed());
        match written {
            Ok(()) => {
                st.applied = Some(self.plan([], ipv6)?);
                Ok(())
            }
            Err(e) => {
                st.applied = None;
                Err(e)
            }
        }
    }

    /// [`OwnTable::rewrite`] off the async runtime.
    pub async fn replan(self: &Arc<Self>) -> Result<(), String> {
        let table = self.clone();
        tokio::task::spawn_blocking(move || table.rewrite())
            .await
            .map_err(|e| format!("rules task failed: {e}"))?
            .map_err(|e| format!("{} in the endpoint's netns: {e}", self.table()))
    }

    /// [`OwnTable::release`] off the async runtime: the table goes if no
    /// connection is live.
    pub async fn remove_if_idle(self: &Arc<Self>) {
        let table = self.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || table.release()).await {
            tracing::warn!(table = %self.table(), error = %e, "cannot remove the idle table");
        }
    }

    /// The table's name, e.g. `inet mesh_proxy_nse`.
    pub fn table(&self) -> String {
        format!("inet {}", self.owner.nft_table())
    }
}
