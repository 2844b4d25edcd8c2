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

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::chain::functions::{Claim, FunctionChain, NetworkFunction};
use crate::firewall::{Firewall, Position};
use crate::mesh_proxy::MeshProxy;
use config::{FunctionsConfig, Kind};

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
}

/// The running instances and the chains they form.
pub struct Started {
    pub instances: Vec<Arc<dyn NetworkFunction>>,
    pub default_chain: FunctionChain,
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
pub fn start(config: &FunctionsConfig, state_dir: Option<&Path>) -> Result<Started, StartError> {
    let mut by_name: BTreeMap<&str, Arc<dyn NetworkFunction>> = BTreeMap::new();
    for (name, kind) in config.used() {
        let f: Arc<dyn NetworkFunction> = match kind {
            Kind::MeshProxy(c) => Arc::new(MeshProxy::start((**c).clone(), state_dir).map_err(
                |source| StartError::MeshProxy {
                    name: name.clone(),
                    source,
                },
            )?),
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
        };
        by_name.insert(name, f);
    }
    let instances: Vec<_> = by_name.values().cloned().collect();
    let default_chain = config.chains[&config.default_chain]
        .iter()
        .map(|n| by_name[n.as_str()].clone())
        .collect();
    Ok(Started {
        instances,
        default_chain,
    })
}

/// What an instance of `kind` will claim.
fn claims_of(kind: &Kind) -> Vec<Claim> {
    match kind {
        Kind::MeshProxy(c) => crate::mesh_proxy::claims(c),
        Kind::Firewall(c) => crate::firewall::claims(c),
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
