//! The hop's connections: plumbs a connection, refreshes it without
//! changing what is right, replaces it when the endpoint changed its answer,
//! and undoes it — always with the state file telling a restarted hop what
//! is out there.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use nsm_api::connection::Connection;

use super::dataplane::{self, Applied};
use super::error::{HopError, Result};
use super::record::{HopRecord, Session};
use super::redirect::{BackendName, client_redirect, owner_for};
use super::state::StateFile;
use super::veth_plan::{Ends, veth_plan};
use crate::netns::Netns;
use crate::rules::spec::Mode;

#[derive(Debug, Clone)]
pub struct HopOptions {
    /// Directory of `state.json` (created 0700 if missing).
    pub state_dir: PathBuf,
    /// Backend for new rules; recorded per connection.
    pub backend: BackendName,
}

/// One connection to plumb.
#[derive(Debug)]
pub struct PlumbRequest<'a> {
    /// The connection's id at this hop (our own path segment's id).
    pub id: &'a str,
    pub client: Netns,
    pub endpoint: Netns,
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

/// Descriptors of an established connection's namespaces, held so undo
/// acts on the very namespaces plumbed (a client's may have no path).
#[derive(Debug)]
struct Held {
    client: Netns,
    endpoint: Netns,
}

#[derive(Debug)]
pub struct Hop {
    backend: BackendName,
    state: StateFile,
    /// Serialises kernel changes across connections: name checks, and
    /// TPROXY policy routes shared by a namespace.
    held: tokio::sync::Mutex<HashMap<String, Held>>,
}

impl Hop {
    /// Opens (and locks) the state; connections recorded there are
    /// "adopted": known, undoable, but without descriptors until refreshed.
    pub fn open(opts: &HopOptions) -> Result<Hop> {
        Ok(Hop {
            backend: opts.backend,
            state: StateFile::open(&opts.state_dir)?,
            held: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    pub fn state_path(&self) -> &Path {
        self.state.path()
    }

    pub fn backend(&self) -> BackendName {
        self.backend
    }

    /// Every connection plumbed (established or adopted).
    pub fn records(&self) -> BTreeMap<String, HopRecord> {
        self.state.records()
    }

    pub fn record(&self, id: &str) -> Option<HopRecord> {
        self.state.get(id)
    }

    /// Connections recorded but not plumbed by this process (a restart).
    pub async fn adopted(&self) -> Vec<(String, HopRecord)> {
        let held = self.held.lock().await;
        self.state
            .records()
            .into_iter()
            .filter(|(id, _)| !held.contains_key(id))
            .collect()
    }

    /// Recorded (by an earlier run) but not plumbed by this process.
    pub async fn is_adopted(&self, id: &str) -> bool {
        let held = self.held.lock().await;
        !held.contains_key(id) && self.state.get(id).is_some()
    }

    /// Plumbs `req` (veth, addresses, routes, client-side rules). Idempotent:
    /// a refresh with the same answer changes nothing that is right and
    /// repairs what is missing. A different answer for a known connection
    /// replaces the old plumbing. A new connection that fails leaves nothing
    /// behind, in either namespace or the state file.
    pub async fn plumb(&self, req: PlumbRequest<'_>) -> Result<PlumbOutcome> {
        let ends = Ends {
            client_netns: req.client.id(),
            endpoint_netns: req.endpoint.id(),
            client_if: req.client_if,
            endpoint_if: req.endpoint_if,
        };
        let plan = veth_plan(ends, req.connection)?;
        let rules = client_redirect(req.connection)?;
        let mut held = self.held.lock().await;
        let record = HopRecord {
            plan,
            rules,
            backend: self.backend,
            owner: owner_for(req.id).as_str().to_owned(),
            client_netns: req.client.id().to_string(),
            endpoint_netns: req.endpoint.id().to_string(),
            session: req.session,
        };
        self.check_conflicts(req.id, &record)?;
        let mut replaced = false;
        if let Some(old) = self.state.get(req.id) {
            if old.same_dataplane(&record) {
                let applied = dataplane::apply(&record, &req.client, &req.endpoint, false).await?;
                self.state.put(req.id, record.clone())?;
                held.insert(
                    req.id.to_owned(),
                    Held {
                        client: req.client,
                        endpoint: req.endpoint,
                    },
                );
                return Ok(PlumbOutcome {
                    record,
                    applied,
                    refreshed: true,
                    replaced: false,
                });
            }
            let h = held.remove(req.id);
            dataplane::undo(
                &old,
                h.as_ref().map(|h| &h.client),
                h.as_ref().map(|h| &h.endpoint),
            )
            .await?;
            self.state.remove(req.id)?;
            self.restore_neighbours(req.id, &old, &held).await;
            replaced = true;
        }
        // Recorded before the kernel changes: a crash half-way is still undone later.
        self.state.put(req.id, record.clone())?;
        match dataplane::apply(&record, &req.client, &req.endpoint, true).await {
            Ok(applied) => {
                held.insert(
                    req.id.to_owned(),
                    Held {
                        client: req.client,
                        endpoint: req.endpoint,
                    },
                );
                Ok(PlumbOutcome {
                    record,
                    applied,
                    refreshed: false,
                    replaced,
                })
            }
            Err(e) => {
                if let Err(se) = self.state.remove(req.id) {
                    tracing::warn!(id = req.id, error = %se, "cannot forget the failed connection in the state file");
                }
                if record.rules.is_some() {
                    self.restore_neighbours(req.id, &record, &held).await;
                }
                Err(e)
            }
        }
    }

    /// Undoes connection `id` (rules, then the veth) and forgets it.
    /// `Ok(None)`: not known. On failure the record stays, so a later
    /// Close or `--cleanup-on-exit` tries again.
    pub async fn unplumb(&self, id: &str) -> Result<Option<HopRecord>> {
        let mut held = self.held.lock().await;
        let Some(record) = self.state.get(id) else {
            held.remove(id);
            return Ok(None);
        };
        let h = held.remove(id);
        dataplane::undo(
            &record,
            h.as_ref().map(|h| &h.client),
            h.as_ref().map(|h| &h.endpoint),
        )
        .await?;
        self.state.remove(id)?;
        if record.rules.is_some() {
            self.restore_neighbours(id, &record, &held).await;
        }
        Ok(Some(record))
    }

    /// Refuses what would step on another connection of this hop.
    fn check_conflicts(&self, id: &str, rec: &HopRecord) -> Result<()> {
        for (other_id, other) in self.state.records() {
            if other_id == id {
                continue;
            }
            let in_use = |name: &str, netns: &str| HopError::InUse {
                name: name.to_owned(),
                netns: netns.to_owned(),
                other: other_id.clone(),
            };
            if other.client_netns == rec.client_netns && other.plan.a.name == rec.plan.a.name {
                return Err(in_use(&rec.plan.a.name, &rec.client_netns));
            }
            if other.endpoint_netns == rec.endpoint_netns && other.plan.b.name == rec.plan.b.name {
                return Err(in_use(&rec.plan.b.name, &rec.endpoint_netns));
            }
            if other.client_netns == rec.client_netns
                && let (Some(a), Some(b)) = (tproxy(&other), tproxy(rec))
                && a != b
            {
                return Err(HopError::TproxyClash {
                    netns: rec.client_netns.clone(),
                    other: other_id.clone(),
                    have_mark: a.0,
                    have_table: a.1,
                    mark: b.0,
                    table: b.1,
                });
            }
        }
        Ok(())
    }

    /// A rules cleanup removes the namespace's TPROXY policy routes, which
    /// other TPROXY connections of the same client namespace share: apply
    /// theirs again. Best effort (logged): the connection at hand is done.
    async fn restore_neighbours(&self, id: &str, gone: &HopRecord, held: &HashMap<String, Held>) {
        for (other_id, other) in self.state.records() {
            if other_id == id || other.client_netns != gone.client_netns || tproxy(&other).is_none()
            {
                continue;
            }
            let client = held.get(&other_id).map(|h| &h.client);
            if let Err(e) = dataplane::reapply_rules(&other, client).await {
                tracing::warn!(id = %other_id, error = %e, "cannot restore TPROXY policy routing after a neighbour's cleanup");
            }
        }
    }
}

/// `(mark, table)` of a TPROXY spec.
fn tproxy(rec: &HopRecord) -> Option<(u32, u32)> {
    rec.rules
        .as_ref()
        .filter(|s| s.mode == Mode::Tproxy)
        .map(|s| (s.tproxy_mark, s.tproxy_route_table))
}
