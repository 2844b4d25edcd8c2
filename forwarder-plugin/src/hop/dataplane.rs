//! One connection's kernel state: the veth (plumb/unplumb) and the client
//! side rules (apply/cleanup), in that order up and the reverse order down.

use crate::link::{self, Links, Plumbed};
use crate::netns::{Netns, NetnsError};
use crate::rules::{self, Backend, BackendOptions, DriftItem, Owner, Plan, RedirectSpec};

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

/// Plumbs the veth, then applies the rules, through netlink handles open
/// in the client's and the endpoint's namespaces. `fresh`: nothing of this
/// connection exists yet, so a failure removes everything this call made;
/// otherwise (a refresh) only what is missing or different is redone and a
/// failure leaves the rest as it was.
pub async fn apply(
    rec: &HopRecord,
    client: &Links,
    endpoint: &Links,
    fresh: bool,
) -> Result<Applied> {
    let plumbed: Plumbed = link::plumb_veth_with(&rec.plan, client, endpoint).await?;
    let mut changed = plumbed.changed;
    if let Some(spec) = &rec.rules {
        let res = rules_apply(rec, spec, client.netns(), fresh).await;
        match res {
            Ok(applied) => changed |= applied,
            Err(e) => {
                if fresh {
                    // The backend rolled its own part back; take the veth away too.
                    if let Err(undo) = link::unplumb_with(&rec.plan, client, Some(endpoint)).await {
                        return Err(HopError::Task(format!(
                            "{e}; removing the veth again also failed: {undo}"
                        )));
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(Applied {
        client_index: plumbed.a.index,
        endpoint_index: plumbed.b.index,
        changed,
    })
}

/// Removes the rules, then the veth. A namespace that no longer exists took
/// its part with it. Both steps run even if the first fails; the first error
/// is returned.
pub async fn undo(rec: &HopRecord, client: Option<&Netns>, endpoint: Option<&Netns>) -> Result<()> {
    let client = held_or_found(client, &rec.client_netns)?;
    let Some(client) = client else {
        // The kernel destroys a veth with either of its namespaces.
        return Ok(());
    };
    let endpoint = held_or_found(endpoint, &rec.endpoint_netns)?;
    let rules = match &rec.rules {
        Some(_) => rules_cleanup(rec, &client).await,
        None => Ok(()),
    };
    let veth = link::unplumb_in(&rec.plan, &client, endpoint.as_ref())
        .await
        .map_err(HopError::from);
    rules.and(veth)
}

/// Applies `rec`'s rules again (e.g. TPROXY policy routes that a
/// neighbour's cleanup removed from the shared namespace).
pub async fn reapply_rules(rec: &HopRecord, client: Option<&Netns>) -> Result<()> {
    let (Some(spec), Some(client)) = (&rec.rules, held_or_found(client, &rec.client_netns)?) else {
        return Ok(());
    };
    rules_apply(rec, spec, &client, true).await.map(|_| ())
}

fn held_or_found(held: Option<&Netns>, url: &str) -> Result<Option<Netns>> {
    if let Some(ns) = held {
        return ns
            .try_clone()
            .map(Some)
            .map_err(|e| HopError::Task(format!("cannot duplicate a namespace descriptor: {e}")));
    }
    match Netns::open(url) {
        Ok(ns) => Ok(Some(ns)),
        Err(NetnsError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
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
async fn rules_apply(
    rec: &HopRecord,
    spec: &RedirectSpec,
    client: &Netns,
    fresh: bool,
) -> Result<bool> {
    let plan = Plan::new(spec).map_err(|source| HopError::Redirect {
        key: super::CLIENT_REDIRECT_KEY,
        source,
    })?;
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
