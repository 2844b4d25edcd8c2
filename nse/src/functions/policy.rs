//! Which chain a connection gets: NetworkService policy, read from a file
//! (`networkServiceFile` in `NSM_CONFIG`) holding one or more NetworkService
//! documents — the Kubernetes resource (`spec.matches`) or the registry's
//! message (`matches`). For the connection's service, the first match whose
//! `source_selector` is a subset of the connection's labels decides: its
//! `metadata.labels["chain"]` names the chain; a match naming none gives the
//! default chain, unless it says `fallthrough: true` (then the next match
//! is tried, as NSM's matchutils does when a match has no candidate). No
//! match, no document for the service: the default chain.
//!
//! The file is ours, not the registry's NetworkService: nsmgr reads
//! `metadata.labels` of a match as forwarder selectors (sdk
//! `discoverforwarder.matchForwarders`), so a chain named in the registry's
//! copy would make it look for forwarders labelled with it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Deserialize;

/// The `metadata.labels` key naming a chain.
pub const CHAIN_LABEL: &str = "chain";
/// Bounds on a policy file.
pub const MAX_SERVICES: usize = 64;
pub const MAX_MATCHES: usize = 256;
pub const MAX_SELECTOR: usize = 32;
pub const MAX_FILE_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    selector: BTreeMap<String, String>,
    chain: Option<String>,
    fallthrough: bool,
}

/// The chains each service's matches select.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    services: BTreeMap<String, Vec<Rule>>,
}

#[derive(Deserialize)]
/// Other keys (apiVersion, payload, …) are NSM's, not ours to check.
struct Doc {
    // The Kubernetes resource…
    #[serde(default)]
    metadata: Option<Meta>,
    #[serde(default)]
    spec: Option<Spec>,
    // …or the registry message.
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    matches: Option<Vec<Match>>,
    #[serde(default)]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct Meta {
    name: String,
}

#[derive(Deserialize)]
struct Spec {
    #[serde(default)]
    matches: Vec<Match>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Match {
    #[serde(default)]
    source_selector: BTreeMap<String, String>,
    /// NSM's endpoint selection: not ours to judge.
    #[serde(default, rename = "routes")]
    _routes: serde_norway::Value,
    #[serde(default)]
    fallthrough: bool,
    #[serde(default)]
    metadata: Option<MatchMeta>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchMeta {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// The policy file's text, at most [`MAX_FILE_BYTES`] of it read.
pub fn read(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "{}: more than {MAX_FILE_BYTES} bytes",
            path.display()
        ));
    }
    Ok(text)
}

impl Policy {
    /// Reads `path`; every chain it names must be one of `chains`.
    pub fn load(path: &Path, chains: &[&str]) -> Result<Policy, String> {
        let text = read(path)?;
        Self::parse(&text, chains).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str, chains: &[&str]) -> Result<Policy, String> {
        let mut services = BTreeMap::new();
        for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
            if i >= MAX_SERVICES {
                return Err(format!("more than {MAX_SERVICES} documents"));
            }
            let value = serde_norway::Value::deserialize(de).map_err(|e| e.to_string())?;
            if value.is_null() {
                continue;
            }
            let doc: Doc =
                serde_norway::from_value(value).map_err(|e| format!("document {i}: {e}"))?;
            if doc.kind.as_deref().is_some_and(|k| k != "NetworkService") {
                return Err(format!(
                    "document {i}: kind {:?} is not NetworkService",
                    doc.kind
                ));
            }
            let (name, matches) = match (doc.metadata, doc.spec, doc.name, doc.matches) {
                (Some(m), Some(s), None, None) => (m.name, s.matches),
                (None, None, Some(n), m) => (n, m.unwrap_or_default()),
                _ => {
                    return Err(format!(
                        "document {i}: neither a NetworkService resource (metadata.name, spec) nor a \
                         registry NetworkService (name, matches)"
                    ));
                }
            };
            if matches.len() > MAX_MATCHES {
                return Err(format!(
                    "{name}: {} matches, at most {MAX_MATCHES}",
                    matches.len()
                ));
            }
            let mut rules = Vec::new();
            for (j, m) in matches.into_iter().enumerate() {
                let at = format!("{name}: matches[{j}]");
                if m.source_selector.len() > MAX_SELECTOR {
                    return Err(format!(
                        "{at}: source_selector has more than {MAX_SELECTOR} labels"
                    ));
                }
                if m.source_selector.values().any(|v| v.contains("{{")) {
                    return Err(format!(
                        "{at}: source_selector values are literal here (no Go templates)"
                    ));
                }
                let chain = m
                    .metadata
                    .and_then(|md| md.labels.get(CHAIN_LABEL).cloned());
                if let Some(c) = &chain
                    && !chains.contains(&c.as_str())
                {
                    return Err(format!(
                        "{at}: metadata.labels.{CHAIN_LABEL} {c:?} is not a chain (chains: {})",
                        chains.join(", ")
                    ));
                }
                rules.push(Rule {
                    selector: m.source_selector,
                    chain,
                    fallthrough: m.fallthrough,
                });
            }
            if services.insert(name.clone(), rules).is_some() {
                return Err(format!("{name}: two documents for the same service"));
            }
        }
        Ok(Policy { services })
    }

    /// The chain for a connection to `service` with `labels`; `None`: the
    /// default chain.
    pub fn chain_for(&self, service: &str, labels: &HashMap<String, String>) -> Option<&str> {
        for r in self.services.get(service)? {
            if !r.selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                continue;
            }
            match &r.chain {
                Some(c) => return Some(c),
                None if r.fallthrough => continue,
                None => return None,
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    const CR: &str = "apiVersion: networkservicemesh.io/v1\nkind: NetworkService\nmetadata:\n  name: mesh-proxy\nspec:\n  payload: IP\n  matches:\n    - source_selector: {app: web}\n      metadata: {labels: {chain: strict}}\n    - source_selector: {team: a}\n      fallthrough: true\n    - source_selector: {team: a}\n      metadata: {labels: {chain: open}}\n    - routes:\n        - destination_selector: {app: mesh-proxy-nse}\n---\nname: other\nmatches:\n  - metadata: {labels: {chain: strict}}\n";

    #[test]
    fn first_match_whose_selector_is_a_subset_names_the_chain() {
        let p = Policy::parse(CR, &["strict", "open"]).unwrap();
        let s = "mesh-proxy";
        assert_eq!(
            p.chain_for(s, &labels(&[("app", "web"), ("x", "y")])),
            Some("strict")
        );
        assert_eq!(p.chain_for(s, &labels(&[("team", "a")])), Some("open"));
        assert_eq!(p.chain_for(s, &labels(&[("app", "db")])), None);
        assert_eq!(p.chain_for("other", &labels(&[])), Some("strict"));
        assert_eq!(p.chain_for("unknown", &labels(&[("app", "web")])), None);
    }

    #[test]
    fn bad_policies_say_where() {
        for (text, want) in [
            (
                CR.replace("chain: open", "chain: lax"),
                "mesh-proxy: matches[2]: metadata.labels.chain \"lax\" is not a chain",
            ),
            (
                "name: a\nmatches:\n  - source_selector: {app: '{{.podName}}'}\n".into(),
                "no Go templates",
            ),
            (
                "kind: Pod\nmetadata: {name: a}\nspec: {}\n".into(),
                "is not NetworkService",
            ),
            (
                "name: a\n---\nname: a\n".into(),
                "two documents for the same service",
            ),
            (
                "name: a\nmatches:\n  - sourceSelector: {app: x}\n".into(),
                "unknown field `sourceSelector`",
            ),
            ("foo: 1\n".into(), "neither a NetworkService resource"),
        ] {
            let e = Policy::parse(&text, &["strict", "open"]).unwrap_err();
            assert!(e.contains(want), "{text}\n→ {e}");
        }
    }
}
