//! `NSM_CONFIG`: the endpoint's network functions and the chains they form.
//!
//! `version: 1` is the mesh-proxy function alone (its keys at the top
//! level, see [`crate::mesh_proxy::config`]); `version: 2` declares named
//! function instances and chains of them, in packet order:
//!
//! ```yaml
//! version: 2
//! functions:
//!   fw:
//!     type: firewall          # see crate::firewall::config
//!     rules: [{action: allow, protocol: tcp, destinationPorts: ["8080"]}]
//!   proxy:
//!     type: mesh-proxy        # the version 1 keys, without `version`
//!     placement: proxy
//! chains:
//!   default: [fw, proxy]
//! defaultChain: default       # optional with one chain
//! networkServiceFile: /etc/mesh-proxy/network-service.yaml  # chain by policy
//! ```
//!
//! `networkServiceFile` chooses a connection's chain by NetworkService
//! policy ([`super::policy`]); without it every connection gets
//! `defaultChain`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::policy::Policy;

use crate::firewall::config::FirewallConfig;
use crate::mesh_proxy::config::FunctionConfig as MeshProxyConfig;
use crate::vpn::config::{VpnConfig, VpnFile};

/// The version this build reads besides version 1.
pub const VERSION: u32 = 2;
/// Bounds on a configuration.
pub const MAX_FUNCTIONS: usize = 16;
pub const MAX_CHAINS: usize = 64;

/// What an instance is, with its own configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    MeshProxy(Box<MeshProxyConfig>),
    Firewall(FirewallConfig),
    Vpn(Box<VpnConfig>),
}

impl Kind {
    pub fn type_name(&self) -> &'static str {
        match self {
            Kind::MeshProxy(_) => crate::mesh_proxy::NAME,
            Kind::Firewall(_) => crate::firewall::TYPE,
            Kind::Vpn(_) => crate::vpn::TYPE,
        }
    }
}

/// The types an instance may have.
pub const TYPES: &str = "mesh-proxy, firewall, vpn";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionsConfig {
    pub functions: BTreeMap<String, Kind>,
    pub chains: BTreeMap<String, Vec<String>>,
    pub default_chain: String,
    /// The NetworkService policy choosing chains, and the policy it held
    /// when the configuration was read.
    pub network_service_file: Option<PathBuf>,
    pub policy: Policy,
}

impl Default for FunctionsConfig {
    /// The mesh-proxy function with its defaults, alone.
    fn default() -> Self {
        Self::single(MeshProxyConfig::default())
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl FunctionsConfig {
    /// A version 1 file: one mesh-proxy instance named `mesh-proxy`.
    pub fn single(c: MeshProxyConfig) -> Self {
        let name = crate::mesh_proxy::NAME.to_owned();
        FunctionsConfig {
            functions: BTreeMap::from([(name.clone(), Kind::MeshProxy(Box::new(c)))]),
            chains: BTreeMap::from([("default".to_owned(), vec![name])]),
            default_chain: "default".into(),
            network_service_file: None,
            policy: Policy::default(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let doc: serde_norway::Value = if text.trim().is_empty() {
            serde_norway::Value::Null
        } else {
            serde_norway::from_str(text).map_err(err)?
        };
        match doc.get("version").map(serde_norway::Value::as_u64) {
            Some(Some(2)) => {}
            None | Some(Some(1)) | Some(None) => {
                return MeshProxyConfig::parse(text).map(Self::single).map_err(err);
            }
            Some(Some(n)) => {
                return Err(format!(
                    "version: unsupported config version {n} (this build reads 1 and {VERSION})"
                ));
            }
        }
        let serde_norway::Value::Mapping(mut top) = doc else {
            return Err("the file is not a mapping".into());
        };
        top.remove("version");
        let functions = take_map(&mut top, "functions")?;
        let chains = take_map(&mut top, "chains")?;
        let default_chain = match top.remove("defaultChain") {
            None => None,
            Some(v) => Some(v.as_str().ok_or("defaultChain: not a string")?.to_owned()),
        };
        let network_service_file = match top.remove("networkServiceFile") {
            None => None,
            Some(v) => Some(PathBuf::from(
                v.as_str().ok_or("networkServiceFile: not a string")?,
            )),
        };
        if let Some(k) = top.keys().next() {
            return Err(format!(
                "unknown key {} (version 2 has functions, chains, defaultChain, networkServiceFile)",
                serde_norway::to_string(k).map_err(err)?.trim()
            ));
        }
        if functions.is_empty() || functions.len() > MAX_FUNCTIONS {
            return Err(format!(
                "functions: {} instances, 1 to {MAX_FUNCTIONS} are needed",
                functions.len()
            ));
        }
        let mut parsed = BTreeMap::new();
        for (name, body) in functions {
            check_name(&name).map_err(|e| format!("functions: {e}"))?;
            let kind = instance(body).map_err(|e| format!("functions.{name}: {e}"))?;
            parsed.insert(name, kind);
        }
        if chains.is_empty() || chains.len() > MAX_CHAINS {
            return Err(format!(
                "chains: {} chains, 1 to {MAX_CHAINS} are needed",
                chains.len()
            ));
        }
        let mut parsed_chains = BTreeMap::new();
        for (name, list) in chains {
            check_name(&name).map_err(|e| format!("chains: {e}"))?;
            let list: Vec<String> =
                serde_norway::from_value(list).map_err(|e| format!("chains.{name}: {e}"))?;
            check_chain(&list, &parsed).map_err(|e| format!("chains.{name}: {e}"))?;
            parsed_chains.insert(name, list);
        }
        let default_chain = match default_chain {
            Some(d) if parsed_chains.contains_key(&d) => d,
            Some(d) => return Err(format!("defaultChain: no chain named {d:?}")),
            None if parsed_chains.len() == 1 => {
                parsed_chains.keys().next().cloned().expect("one chain")
            }
            None => return Err("defaultChain: needed when there are several chains".into()),
        };
        let policy = match &network_service_file {
            None => Policy::default(),
            Some(path) => {
                let names: Vec<&str> = parsed_chains.keys().map(String::as_str).collect();
                Policy::load(path, &names).map_err(|e| format!("networkServiceFile: {e}"))?
            }
        };
        let config = FunctionsConfig {
            functions: parsed,
            chains: parsed_chains,
            default_chain,
            network_service_file,
            policy,
        };
        super::check(&config)?;
        Ok(config)
    }

    /// The instances some chain uses, with the chains' instance lists.
    pub fn used(&self) -> impl Iterator<Item = (&String, &Kind)> {
        self.functions
            .iter()
            .filter(|(n, _)| self.chains.values().any(|c| c.contains(n)))
    }
}

fn take_map(
    top: &mut serde_norway::Mapping,
    key: &str,
) -> Result<Vec<(String, serde_norway::Value)>, String> {
    match top.remove(key) {
        None => Ok(Vec::new()),
        Some(serde_norway::Value::Mapping(m)) => m
            .into_iter()
            .map(|(k, v)| match k {
                serde_norway::Value::String(s) => Ok((s, v)),
                other => Err(format!("{key}: key {other:?} is not a name")),
            })
            .collect(),
        Some(_) => Err(format!("{key}: not a mapping")),
    }
}

/// Names go into logs, errors and (for chains) labels: DNS-label-like.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a name (1-63 of a-z, A-Z, 0-9, '-', '_')"
        ))
    }
}

fn instance(body: serde_norway::Value) -> Result<Kind, String> {
    let serde_norway::Value::Mapping(mut m) = body else {
        return Err("not a mapping".into());
    };
    let kind = match m.remove("type") {
        Some(serde_norway::Value::String(t)) => t,
        Some(_) => return Err("type: not a string".into()),
        None => return Err(format!("type: missing ({TYPES})")),
    };
    match kind.as_str() {
        crate::mesh_proxy::NAME => {
            m.insert("version".into(), 1.into());
            let text = serde_norway::to_string(&m).map_err(err)?;
            MeshProxyConfig::parse(&text)
                .map(|c| Kind::MeshProxy(Box::new(c)))
                .map_err(err)
        }
        // Through text, so serde's errors name the key path.
        crate::firewall::TYPE => serde_norway::to_string(&m)
            .map_err(err)
            .and_then(|text| serde_norway::from_str::<FirewallConfig>(&text).map_err(err))
            .and_then(FirewallConfig::resolve)
            .map(Kind::Firewall),
        crate::vpn::TYPE => serde_norway::to_string(&m)
            .map_err(err)
            .and_then(|text| serde_norway::from_str::<VpnFile>(&text).map_err(err))
            .and_then(VpnFile::resolve)
            .map(|c| Kind::Vpn(Box::new(c))),
        other => Err(format!("type: unknown function type {other:?} ({TYPES})")),
    }
}

fn check_chain(list: &[String], functions: &BTreeMap<String, Kind>) -> Result<(), String> {
    if list.is_empty() {
        return Err("empty".into());
    }
    for (i, name) in list.iter().enumerate() {
        if !functions.contains_key(name) {
            return Err(format!("no function named {name:?}"));
        }
        if list[..i].contains(name) {
            return Err(format!("{name:?} is listed twice"));
        }
    }
    let proxies = list
        .iter()
        .filter(|n| matches!(functions.get(*n), Some(Kind::MeshProxy(_))))
        .count();
    if proxies > 1 {
        return Err("more than one mesh-proxy: a connection has one proxy".into());
    }
    if let Some(vpn) = list[..list.len() - 1]
        .iter()
        .find(|n| matches!(functions.get(*n), Some(Kind::Vpn(_))))
    {
        return Err(format!(
            "{vpn:?} is a vpn and not last: a tunnel is where packets leave the endpoint"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAIN: &str = "version: 2\nfunctions:\n  fw:\n    type: firewall\n    rules: [{action: allow, protocol: tcp, destinationPorts: ['8080']}]\n  proxy:\n    type: mesh-proxy\n    proxy: {port: 15100}\nchains:\n  default: [fw, proxy]\n";

    #[test]
    fn version_1_is_mesh_proxy_alone() {
        let c = FunctionsConfig::parse("version: 1\nplacement: sidecar\n").unwrap();
        assert_eq!(c.chains["default"], ["mesh-proxy"]);
        assert!(
            matches!(&c.functions["mesh-proxy"], Kind::MeshProxy(m) if m.placement == crate::mesh_proxy::config::Placement::Sidecar)
        );
        assert_eq!(
            FunctionsConfig::parse("").unwrap(),
            FunctionsConfig::default()
        );
    }

    #[test]
    fn version_2_names_instances_and_chains() {
        let c = FunctionsConfig::parse(CHAIN).unwrap();
        assert_eq!(c.default_chain, "default");
        assert_eq!(c.chains["default"], ["fw", "proxy"]);
        assert!(matches!(&c.functions["proxy"], Kind::MeshProxy(m) if m.proxy.port.0 == 15100));
        assert!(matches!(&c.functions["fw"], Kind::Firewall(f) if f.rules.len() == 1));
    }

    #[test]
    fn bad_chains_say_where() {
        let fw = "version: 2\nfunctions:\n  fw: {type: firewall}\n  p: {type: mesh-proxy}\n  q: {type: mesh-proxy, rules: {owner: other}}\n";
        for (text, want) in [
            (format!("{fw}chains:\n  a: [fw, nope]\n"), "chains.a: no function named \"nope\""),
            (format!("{fw}chains:\n  a: [fw, fw]\n"), "chains.a: \"fw\" is listed twice"),
            (format!("{fw}chains:\n  a: [p, q]\n"), "more than one mesh-proxy"),
            (format!("{fw}chains:\n  a: []\n"), "chains.a: empty"),
            (format!("{fw}chains:\n  a: [fw]\n  b: [p]\n"), "defaultChain: needed"),
            (format!("{fw}chains:\n  a: [fw]\ndefaultChain: b\n"), "defaultChain: no chain named \"b\""),
            (fw.to_string(), "chains: 0 chains"),
            (format!("{fw}chains:\n  a: [fw]\nchain: [fw]\n"), "unknown key chain"),
            ("version: 2\nfunctions:\n  x: {type: nat}\nchains: {a: [x]}\n".into(), "functions.x: type: unknown function type \"nat\""),
            ("version: 2\nfunctions:\n  x: {rules: []}\nchains: {a: [x]}\n".into(), "functions.x: type: missing"),
            ("version: 2\nfunctions:\n  x: {type: mesh-proxy, placement: elsewhere}\nchains: {a: [x]}\n".into(), "functions.x:"),
            ("version: 2\nfunctions:\n  'a b': {type: firewall}\nchains: {a: ['a b']}\n".into(), "is not a name"),
            ("version: 3\n".into(), "unsupported config version 3"),
        ] {
            let e = FunctionsConfig::parse(&text).unwrap_err();
            assert!(e.contains(want), "{text}\n→ {e}");
        }
    }
}

#[cfg(test)]
mod examples {
    use super::*;

    /// The example files in examples/config stay true.
    #[test]
    fn the_example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/config");
        let c = FunctionsConfig::load(&dir.join("firewall-then-mesh-proxy.yaml")).unwrap();
        assert_eq!(c.chains["default"], ["fw", "proxy"]);
        let acl = dir.join("nsm-acl.yaml");
        let text = std::fs::read_to_string(dir.join("mesh-proxy-then-nsm-acl.yaml"))
            .unwrap()
            .replace("/etc/firewall/config.yaml", acl.to_str().unwrap());
        let c = FunctionsConfig::parse(&text).unwrap();
        let Kind::Firewall(fw) = &c.functions["upstream"] else {
            panic!("a firewall")
        };
        assert_eq!(fw.rules.len(), 2);
        let text = std::fs::read_to_string(dir.join("chains-by-policy.yaml"))
            .unwrap()
            .replace(
                "/etc/mesh-proxy/network-service-policy.yaml",
                dir.join("network-service-policy.yaml").to_str().unwrap(),
            );
        let c = FunctionsConfig::parse(&text).unwrap();
        let labels = [("app".to_owned(), "payments".to_owned())].into();
        assert_eq!(c.policy.chain_for("mesh-proxy", &labels), Some("strict"));
        // The vpn example, with keys where it expects them.
        let k = forwarder_plugin::wireguard::generate_private_key().unwrap();
        let tmp = std::env::temp_dir().join(format!("vpn-example-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let (private, public) = (tmp.join("private.key"), tmp.join("peer.pub"));
        let enc = forwarder_plugin::wireguard::encode_key;
        std::fs::write(&private, enc(&k)).unwrap();
        std::fs::write(&public, enc(&forwarder_plugin::wireguard::public_key(&k))).unwrap();
        let text = std::fs::read_to_string(dir.join("firewall-mesh-proxy-vpn.yaml"))
            .unwrap()
            .replace("/etc/wireguard/private.key", private.to_str().unwrap())
            .replace("/etc/wireguard/peer.pub", public.to_str().unwrap());
        let c = FunctionsConfig::parse(&text);
        let _ = std::fs::remove_dir_all(&tmp);
        assert_eq!(c.unwrap().chains["default"], ["fw", "proxy", "vpn"]);
    }
}

#[cfg(test)]
mod vpn_position {
    use super::*;
    use forwarder_plugin::wireguard;

    #[test]
    fn a_vpn_is_last_in_its_chains() {
        let dir = std::env::temp_dir().join(format!("vpn-chain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("k");
        let k = wireguard::generate_private_key().unwrap();
        std::fs::write(&key, wireguard::encode_key(&k)).unwrap();
        let vpn = format!(
            "version: 2\nfunctions:\n  p: {{type: mesh-proxy}}\n  v:\n    type: vpn\n    privateKeyFile: {}\n    address: [198.18.210.1/32]\n    peer: {{publicKey: {}, endpoint: '198.18.200.2:51820', allowedIps: [198.19.200.0/24]}}\n",
            key.display(),
            wireguard::encode_key(&wireguard::public_key(&k))
        );
        let ok = FunctionsConfig::parse(&format!("{vpn}chains: {{a: [p, v]}}\n")).unwrap();
        assert!(matches!(ok.functions["v"], Kind::Vpn(_)));
        let e = FunctionsConfig::parse(&format!("{vpn}chains: {{a: [v, p]}}\n")).unwrap_err();
        assert!(e.contains("chains.a: \"v\" is a vpn and not last"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
