//! The endpoint's network functions as its configuration declares them
//! ([`config`]): each instance a chain uses is started once (adopting what a
//! previous run left), their claims are checked against each other, and the
//! chains become lists of running instances in packet order.
//!
//! Adding a function type: a config struct (serde, unknown keys refused), a
//! `Kind` variant and its `type:` name in [`config`], an implementation of
//! [`NetworkFunction`] (apply/undo per connection, claims, upkeep), and its
//! start-up in [`start`] — see nse/README.md "Network functions".

pub mod config;
pub mod policy;
pub mod reload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use nsm_api::connection::Connection;

use crate::chain::functions::{ChainSelector, Claim, FunctionChain, NetworkFunction};
use crate::firewall::{Firewall, Position};
use crate::mesh_proxy::MeshProxy;
use config::{FunctionsConfig, Kind};
use policy::Policy;

/// How often functions repair drift and let go of adopted connections whose
/// interface is gone.
pub const MAINTENANCE_PERIOD: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("function {name}: {source}")]
    MeshProxy {
        name: String,
        #[source]
        source: crate::mesh_proxy::StartError,
    },
    #[error("function {name}: {source}")]
    Firewall {
        name: String,
        #[source]
        source: crate::firewall::FirewallError,
    },
    #[error("{0}")]
    Config(String),
    #[error("function {name}: {source}")]
    Vpn {
        name: String,
        #[source]
        source: forwarder_plugin::wireguard::WgError,
    },
}

/// The running instances and the chains they form.
pub struct Started {
    pub instances: Vec<Arc<dyn NetworkFunction>>,
    pub chains: Arc<Chains>,
    /// The mesh-proxy instances by name (their proxy definitions are
    /// reloadable, [`reload`]).
    pub meshes: Vec<(String, Arc<MeshProxy>)>,
}

/// The chains by name and the policy choosing among them, re-read when its
/// file changes (a change applies to new connections, and to existing ones
/// at their next refresh).
pub struct Chains {
    by_name: BTreeMap<String, FunctionChain>,
    default: String,
    file: Option<PathBuf>,
    policy: RwLock<Policy>,
    /// What the policy was read from last, so a rewrite with the same
    /// content changes nothing.
    seen: Mutex<Option<String>>,
}

impl Chains {
    pub fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }

    pub fn default_chain(&self) -> &FunctionChain {
        &self.by_name[&self.default]
    }

    /// Reads the policy file again if its content changed; a file that
    /// cannot be read or is wrong keeps the policy in force (logged).
    pub fn reload_if_changed(&self) {
        let Some(path) = &self.file else { return };
        let text = match policy::read(path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the NetworkService policy: the policy in force stays");
                return;
            }
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.as_deref() == Some(text.as_str()) {
            return;
        }
        match Policy::parse(&text, &self.names()) {
            Ok(p) => {
                *self.policy.write().unwrap_or_else(|p| p.into_inner()) = p;
                tracing::info!(file = %path.display(), "NetworkService policy reloaded");
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "the NetworkService policy is wrong: the policy in force stays");
            }
        }
        *seen = Some(text);
    }
}

impl ChainSelector for Chains {
    fn select(&self, conn: &Connection) -> (String, FunctionChain) {
        let policy = self.policy.read().unwrap_or_else(|p| p.into_inner());
        let name = policy
            .chain_for(&conn.network_service, &conn.labels)
            .unwrap_or(&self.default);
        match self.by_name.get(name) {
            Some(c) => (name.to_owned(), c.clone()),
            // Policies are checked against the chains when read.
            None => (self.default.clone(), self.default_chain().clone()),
        }
    }
}

/// Where a firewall instance sits: after a mesh proxy in its chains, or not.
pub fn position(config: &FunctionsConfig, name: &str) -> Result<Position, String> {
    let mut seen = None;
    for chain in config.chains.values() {
        let Some(at) = chain.iter().position(|n| n == name) else {
            continue;
        };
        let after = chain[..at]
            .iter()
            .any(|n| matches!(config.functions.get(n), Some(Kind::MeshProxy(_))));
        let p = if after {
            Position::Egress
        } else {
            Position::Ingress
        };
        if seen.is_some_and(|s| s != p) {
            return Err(format!(
                "functions.{name}: sits before the mesh proxy in one chain and after it in \
                 another: declare one instance per position"
            ));
        }
        seen = Some(p);
    }
    Ok(seen.unwrap_or(Position::Ingress))
}

/// Two instances a chain uses may not claim the same thing, nor may a
/// firewall sit on both sides of the proxy ([`config::FunctionsConfig::parse`]
/// refuses such a file).
pub fn check(config: &FunctionsConfig) -> Result<(), String> {
    let mut owners: BTreeMap<Claim, &str> = BTreeMap::new();
    for (name, kind) in config.used() {
        for c in claims_of(kind) {
            if let Some(first) = owners.get(&c) {
                return Err(format!("functions {first} and {name} both claim the {c}"));
            }
            owners.insert(c, name);
        }
        if matches!(kind, Kind::Firewall(_)) {
            position(config, name)?;
        }
    }
    Ok(())
}

/// Starts what `config` (checked when parsed, [`check`]) declares. Claims
/// follow from configuration alone (each instance's
/// [`NetworkFunction::claims`] says the same), so a conflict is refused
/// before any table is adopted or removed.
pub async fn start(
    config: &FunctionsConfig,
    state_dir: Option<&Path>,
) -> Result<Started, StartError> {
    let mut by_name: BTreeMap<&str, Arc<dyn NetworkFunction>> = BTreeMap::new();
    let mut meshes = Vec::new();
    for (name, kind) in config.used() {
        let f: Arc<dyn NetworkFunction> = match kind {
            Kind::MeshProxy(c) => {
                let m = Arc::new(
                    MeshProxy::start((**c).clone(), state_dir).map_err(|source| {
                        StartError::MeshProxy {
                            name: name.clone(),
                            source,
                        }
                    })?,
                );
                meshes.push((name.clone(), m.clone()));
                m
            }
            Kind::Firewall(c) => {
                let at = position(config, name).map_err(StartError::Config)?;
                Arc::new(
                    Firewall::start(name, c.clone(), at, state_dir).map_err(|source| {
                        StartError::Firewall {
                            name: name.clone(),
                            source,
                        }
                    })?,
                )
            }
            Kind::Vpn(c) => Arc::new(crate::vpn::Vpn::start(name, (**c).clone()).await.map_err(
                |source| StartError::Vpn {
                    name: name.clone(),
                    source,
                },
            )?),
        };
        by_name.insert(name, f);
    }
    let instances: Vec<_> = by_name.values().cloned().collect();
    let chains = config
        .chains
        .iter()
        .map(|(name, list)| {
            let chain: FunctionChain = list.iter().map(|n| by_name[n.as_str()].clone()).collect();
            (name.clone(), chain)
        })
        .collect();
    let seen = config
        .network_service_file
        .as_ref()
        .and_then(|p| policy::read(p).ok());
    Ok(Started {
        instances,
        chains: Arc::new(Chains {
            by_name: chains,
            default: config.default_chain.clone(),
            file: config.network_service_file.clone(),
            policy: RwLock::new(config.policy.clone()),
            seen: Mutex::new(seen),
        }),
        meshes,
    })
}

/// What an instance of `kind` will claim.
fn claims_of(kind: &Kind) -> Vec<Claim> {
    match kind {
        Kind::MeshProxy(c) => crate::mesh_proxy::claims(c),
        Kind::Firewall(c) => crate::firewall::claims(c),
        Kind::Vpn(c) => crate::vpn::claims(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> String {
        FunctionsConfig::parse(text).expect_err("refused")
    }

    #[test]
    fn a_shared_table_is_refused_before_anything_starts() {
        assert_eq!(
            refused(
                "version: 2\nfunctions:\n  a: {type: firewall}\n  b: {type: firewall}\nchains:\n  x: [a]\n  y: [b]\ndefaultChain: x\n"
            ),
            "functions a and b both claim the rules table nsm_firewall"
        );
        // An instance no chain uses starts nothing, so it claims nothing.
        FunctionsConfig::parse(
            "version: 2\nfunctions:\n  a: {type: firewall}\n  b: {type: firewall}\nchains:\n  x: [a]\n",
        )
        .unwrap();
    }

    #[test]
    fn a_firewall_on_both_sides_of_the_proxy_is_refused() {
        assert!(
            refused(
                "version: 2\nfunctions:\n  fw: {type: firewall}\n  p: {type: mesh-proxy}\nchains:\n  x: [fw, p]\n  y: [p, fw]\ndefaultChain: x\n"
            )
            .contains("functions.fw: sits before the mesh proxy in one chain and after it")
        );
        let c = FunctionsConfig::parse(
            "version: 2\nfunctions:\n  fw: {type: firewall}\n  p: {type: mesh-proxy}\nchains:\n  x: [p, fw]\n",
        )
        .unwrap();
        assert_eq!(position(&c, "fw").unwrap(), Position::Egress);
    }
}
