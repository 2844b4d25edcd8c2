//! Placement proxy: the one table this function owns in the NSE's own
//! netns, regenerated from the live connections' interfaces on every
//! change. One spec for all connections (`includeInterfaces` = their
//! interfaces) keeps the kernel state a pure function of the live set, so
//! apply is idempotent and a restart can start from "no table".

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use forwarder_plugin::netns::{Netns, NetnsError};
use forwarder_plugin::rules::{self, Backend, BackendOptions, Plan, RulesError};

use super::config::FunctionConfig;

/// What the table needs of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// The NSE-side interface (the KERNEL mechanism's `name`).
    pub interface: String,
    /// The connection has IPv6 addresses, so IPv6 is captured too.
    pub ipv6: bool,
}

pub struct OwnRules {
    config: FunctionConfig,
    netns: Netns,
    backend: Box<dyn Backend>,
    /// Connection id → what it needs; the table always matches it.
    live: Mutex<BTreeMap<String, Live>>,
}

impl OwnRules {
    /// For the calling thread's netns (the process never leaves its own).
    pub fn new(config: &FunctionConfig) -> Result<OwnRules, NetnsError> {
        let backend = rules::get_backend(
            config.rules.backend.kind(),
            BackendOptions {
                owner: config.rules.owner.clone(),
                ..Default::default()
            },
        );
        Ok(OwnRules {
            config: config.clone(),
            netns: Netns::current()?,
            backend,
            live: Mutex::new(BTreeMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Live>> {
        // Every critical section leaves the map matching the kernel or unchanged.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The plan for a live set; `None` when nothing is live (no table).
    fn plan(&self, live: &BTreeMap<String, Live>) -> Result<Option<Plan>, RulesError> {
        if live.is_empty() {
            return Ok(None);
        }
        let interfaces: BTreeSet<&String> = live.values().map(|l| &l.interface).collect();
        let ipv6 = live.values().any(|l| l.ipv6);
        let spec = self
            .config
            .own_spec(interfaces.into_iter().cloned().collect(), ipv6);
        Ok(Some(Plan::new(&spec)?))
    }

    fn write(&self, live: &BTreeMap<String, Live>) -> Result<(), RulesError> {
        match self.plan(live)? {
            Some(plan) => self.backend.apply(&self.netns, &plan).map(|_| ()),
            None => self.backend.cleanup(&self.netns),
        }
    }

    /// Sets connection `id`'s entry (`None`: removes it) and makes the table
    /// match. All or nothing: on error the previous set is restored in the
    /// kernel (best effort) and kept here. Removing an unknown id touches
    /// nothing; setting an entry always re-applies, which is a read when
    /// the table is already right and a repair when it drifted.
    pub fn update(&self, id: &str, entry: Option<Live>) -> Result<(), RulesError> {
        let mut live = self.lock();
        let mut next = live.clone();
        match entry {
            Some(e) => {
                next.insert(id.to_owned(), e);
            }
            None => {
                if next.remove(id).is_none() {
                    return Ok(());
                }
            }
        }
        if let Err(e) = self.write(&next) {
            // The backends apply atomically, but a rollback of theirs may
            // have removed the whole table: put the previous set back.
            if let Err(again) = self.write(&live) {
                tracing::error!(error = %again, "cannot restore the previous redirect rules");
            }
            return Err(e);
        }
        *live = next;
        Ok(())
    }

    /// Removes the table whatever is live (start-up: after a restart no
    /// connection is known until clients refresh).
    pub fn cleanup(&self) -> Result<(), RulesError> {
        let mut live = self.lock();
        self.backend.cleanup(&self.netns)?;
        live.clear();
        Ok(())
    }

    /// The interfaces whose traffic is captured now.
    pub fn interfaces(&self) -> Vec<String> {
        let live = self.lock();
        let set: BTreeSet<&String> = live.values().map(|l| &l.interface).collect();
        set.into_iter().cloned().collect()
    }

    /// The table's name, e.g. `inet mesh_proxy_nse`.
    pub fn table(&self) -> String {
        format!("inet {}", self.config.rules.owner.nft_table())
    }
}
