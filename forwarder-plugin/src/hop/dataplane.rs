//! One connection's kernel state: the veth with its routes (plumb/unplumb),
//! the client namespace's policy-routing rules ([`super::client_routing`]),
//! then the client-side firewall rules (a redirect spec or a capture plan),
//! in that order up and the reverse order down.

use crate::link::{self, Links, Plumbed};
use crate::netns::{Netns, NetnsError};
use crate::rules::{self, Backend, BackendOptions, DriftItem, Owner, Plan};

use super::client_routing::ClientRouting;
use super::error::{HopError, Result};
use super::record::HopRecord;

/// What an apply left in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub client_index: u32,
    pub endpoint_index: u32,
    /// `false` when everything was already in place.
    pub changed: bool,
}

/// Whether the connection has firewall rules in its client's namespace.
pub fn has_firewall(rec: &HopRecord) -> bool {
    rec.rules.is_some() || rec.capture.is_some()
}

/// Plumbs the veth (with the client routing's routes), adds the client
/// routing's rules, then applies the firewall rules, through netlink
/// handles open in the client's and the endpoint's namespaces. `fresh`:
/// nothing of this connection exists yet, so a failure removes everything
/// this call made; otherwise (a refresh) only what is missing or different
/// is redone and a failure leaves the rest as it was.
pub async fn apply(
    rec: &HopRecord,
    client: &Links,
    endpoint: &Links,
    fresh: bool,
) -> Result<Applied> {
    let routing = rec.client_routing()?;
    let firewall = firewall_plan(rec, &routing)?;
    let plan = rec.veth_with_routing(&routing);
    let plumbed: Plumbed = link::plumb_veth_with(&plan, client, endpoint).await?;
    let mut changed = plumbed.changed;
    let mut res = Ok(());
    for rule in &routing.rules {
        match client.add_rule(rule).await {
            Ok(added) => changed |= added,
            Err(e) => {
                res = Err(HopError::from(e));
                break;
            }
        }
    }
    if res.is_ok()
        && let Some(fw) = firewall
    {
        match rules_apply(rec, fw, client.netns(), fresh).await {
            Ok(applied) => changed |= applied,
            Err(e) => res = Err(e),
        }
    }
    if let Err(e) = res {
        if fresh {
            // The firewall backend rolled its own part back.
            let undone = remove_routing(&routing, client).await.and(
                link::unplumb_with(&plan, client, Some(endpoint))
                    .await
                    .map_err(HopError::from),
            );
            if let Err(undo) = undone {
                return Err(HopError::Task(format!(
                    "{e}; undoing the connection again also failed: {undo}"
                )));
            }
        }
        return Err(e);
    }
    Ok(Applied {
        client_index: plumbed.a.index,
        endpoint_index: plumbed.b.index,
        changed,
    })
}

/// Removes the firewall rules, the client routing's rules, then the veth
/// (its routes go with it). A namespace that no longer exists took its
/// part with it. Every step runs even if an earlier one fails; the errors
/// are reported together.
pub async fn undo(rec: &HopRecord, client: Option<&Netns>, endpoint: Option<&Netns>) -> Result<()> {
    let client = held_or_found(client, &rec.client_netns, rec.client_cookie)?;
    let Some(client) = client else {
        // The kernel destroys a veth with either of its namespaces.
        return Ok(());
    };
    let endpoint = held_or_found(endpoint, &rec.endpoint_netns, rec.endpoint_cookie)?;
    let mut errors = Vec::new();
    if has_firewall(rec)
        && let Err(e) = rules_cleanup(rec, &client).await
    {
        errors.push(e);
    }
    if rec.needs_slot() {
        let removed = match (rec.client_routing(), Links::open(&client)) {
            (Ok(routing), Ok(links)) => remove_routing(&routing, &links).await,
            (Err(e), _) => Err(e),
            (_, Err(e)) => Err(e.into()),
        };
        if let Err(e) = removed {
            errors.push(e);
        }
    }
    if let Err(e) = link::unplumb_in(&rec.plan, &client, endpoint.as_ref()).await {
        errors.push(e.into());
    }
    combine(errors)
}

/// One error for several (the first's kind, every message).
fn combine(mut errors: Vec<HopError>) -> Result<()> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(HopError::Task(
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )),
    }
}

/// Deletes the routing's rules (absent ones are fine).
async fn remove_routing(routing: &ClientRouting, client: &Links) -> Result<()> {
    let mut errors = Vec::new();
    for rule in &routing.rules {
        if let Err(e) = client.del_rule(rule).await {
            errors.push(HopError::from(e));
        }
    }
    combine(errors)
}

/// Applies `rec`'s firewall rules again (e.g. TPROXY policy routes that a
/// neighbour's cleanup removed from the shared namespace).
pub async fn reapply_rules(rec: &HopRecord, client: Option<&Netns>) -> Result<()> {
    let Some(client) = held_or_found(client, &rec.client_netns, rec.client_cookie)? else {
        return Ok(());
    };
    let routing = rec.client_routing()?;
    match firewall_plan(rec, &routing)? {
        Some(plan) => rules_apply(rec, plan, &client, true).await.map(|_| ()),
        None => Ok(()),
    }
}

/// Checks `rec`'s firewall rules in the client's namespace and applies
/// them again if they drifted (e.g. the pod's ruleset was flushed): true if
/// it had to. A namespace that is gone is nothing to repair.
pub async fn repair_rules(rec: &HopRecord, client: Option<&Netns>) -> Result<bool> {
    let Some(client) = held_or_found(client, &rec.client_netns, rec.client_cookie)? else {
        return Ok(false);
    };
    let routing = rec.client_routing()?;
    match firewall_plan(rec, &routing)? {
        Some(plan) => rules_apply(rec, plan, &client, false).await,
        None => Ok(false),
    }
}

/// The firewall rules of the client's namespace: the redirect spec's, or
/// the capture plan.
fn firewall_plan(rec: &HopRecord, routing: &ClientRouting) -> Result<Option<Plan>> {
    if let Some(spec) = &rec.applied_rules() {
        return Plan::new(spec)
            .map(Some)
            .map_err(|source| HopError::Redirect {
                key: super::CLIENT_REDIRECT_KEY,
                source,
            });
    }
    Ok(routing.capture.clone())
}

/// The namespace `held` (this process plumbed it), or the one found by
/// inode `url` after a restart — only if its cookie is the recorded one: an
/// inode number may name a newer namespace once the recorded one is gone.
/// `None`: gone.
pub(crate) fn held_or_found(
    held: Option<&Netns>,
    url: &str,
    cookie: Option<u64>,
) -> Result<Option<Netns>> {
    if let Some(ns) = held {
        return ns
            .try_clone()
            .map(Some)
            .map_err(|e| HopError::Task(format!("cannot duplicate a namespace descriptor: {e}")));
    }
    let ns = match Netns::open(url) {
        Ok(ns) => ns,
        Err(NetnsError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    match cookie {
        Some(want) => {
            let have = ns.cookie()?;
            if have == want {
                Ok(Some(ns))
            } else {
                tracing::warn!(
                    netns = url,
                    "the namespace with the recorded inode is another one (its cookie differs): the recorded one is gone"
                );
                Ok(None)
            }
        }
        // Recorded before cookies were: the inode is all there is.
        None => Ok(Some(ns)),
    }
}

fn backend(rec: &HopRecord) -> Result<Box<dyn Backend>> {
    let owner = Owner::new(&rec.owner)?;
    Ok(rules::get_backend(
        rec.backend.kind(),
        BackendOptions {
            owner,
            ..Default::default()
        },
    ))
}

/// `fresh`: apply outright. Otherwise verify first and apply only on drift
/// that is ours: TPROXY policy routes are shared by the namespace's
/// connections, so another connection's are not drift of this one.
async fn rules_apply(rec: &HopRecord, plan: Plan, client: &Netns, fresh: bool) -> Result<bool> {
    let backend = backend(rec)?;
    let ns = dup(client)?;
    blocking(move || {
        if !fresh {
            let drift = backend.verify(&ns, &plan)?;
            if drift
                .items
                .iter()
                .all(|i| matches!(i, DriftItem::ExtraPolicyRoute { .. }))
            {
                return Ok(false);
            }
        }
        backend.apply(&ns, &plan)?;
        Ok(true)
    })
    .await
}

async fn rules_cleanup(rec: &HopRecord, client: &Netns) -> Result<()> {
    let backend = backend(rec)?;
    let ns = dup(client)?;
    blocking(move || Ok(backend.cleanup(&ns)?)).await
}

fn dup(ns: &Netns) -> Result<Netns> {
    ns.try_clone()
        .map_err(|e| HopError::Task(format!("cannot duplicate a namespace descriptor: {e}")))
}

/// Rule backends block (netlink round trips, `ip`/`iptables-restore`).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HopError::Task(format!("rules task failed: {e}")))?
}
