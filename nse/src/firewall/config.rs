//! The firewall function's configuration: ordered allow/deny rules and a
//! default action, in our own form or read from a file in NSM's
//! cmd-nse-firewall-vpp ACL format ([`super::nsm_acl`]).
//!
//! ```yaml
//! type: firewall
//! defaultAction: deny          # allow | deny
//! rules:                       # first match wins
//!   - action: allow            # allow | deny
//!     protocol: tcp            # any | tcp | udp | icmp | icmpv6
//!     sourceCidrs: []          # empty: any
//!     destinationCidrs: [198.19.0.0/16]
//!     sourcePorts: []          # tcp/udp only; empty: any
//!     destinationPorts: ["8080", "9000-9100"]
//! nsmAclFile: /etc/firewall/config.yaml   # NSM's ACL rules, after `rules`
//! table:
//!   backend: nft               # nft | iptables
//!   owner: nsm_firewall        # nft table inet <owner> / iptables chains <OWNER>_*
//! ```

use std::path::PathBuf;

use forwarder_plugin::hop::BackendName;
use forwarder_plugin::rules::{Owner, PortRange};
use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, Deserializer};

use crate::mesh_proxy::config::parse_cidr;

/// Bounds on what one configuration may ask for (each rule expands to the
/// product of its lists).
pub const MAX_RULES: usize = 256;
pub const MAX_EXPANDED: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Any,
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

/// One rule: it matches when every list it gives matches (an empty list
/// matches anything; within a list, any element).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FirewallRule {
    pub action: Verdict,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, deserialize_with = "de_cidrs")]
    pub source_cidrs: Vec<IpNet>,
    #[serde(default, deserialize_with = "de_cidrs")]
    pub destination_cidrs: Vec<IpNet>,
    #[serde(default)]
    pub source_ports: Vec<PortRange>,
    #[serde(default)]
    pub destination_ports: Vec<PortRange>,
}

/// Where the firewall's table goes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TableConfig {
    pub backend: BackendName,
    #[serde(deserialize_with = "de_owner")]
    pub owner: Owner,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            backend: BackendName::Nft,
            owner: Owner::new(DEFAULT_OWNER).expect("valid owner literal"),
        }
    }
}

pub const DEFAULT_OWNER: &str = "nsm_firewall";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FirewallConfig {
    /// What no rule matched gets (deny, as NSM's VPP ACLs).
    #[serde(default = "deny")]
    pub default_action: Verdict,
    #[serde(default)]
    pub rules: Vec<FirewallRule>,
    /// Rules in NSM's ACL format, appended to `rules` in name order.
    #[serde(default)]
    pub nsm_acl_file: Option<PathBuf>,
    #[serde(default)]
    pub table: TableConfig,
}

fn deny() -> Verdict {
    Verdict::Deny
}

impl FirewallConfig {
    /// Checks what serde cannot and reads `nsmAclFile` into `rules`: the
    /// rules as the function applies them.
    pub fn resolve(mut self) -> Result<FirewallConfig, String> {
        if let Some(path) = self.nsm_acl_file.take() {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("nsmAclFile: cannot read {}: {e}", path.display()))?;
            let acl = super::nsm_acl::parse(&text)
                .map_err(|e| format!("nsmAclFile {}: {e}", path.display()))?;
            self.rules.extend(acl);
        }
        if self.rules.len() > MAX_RULES {
            return Err(format!(
                "rules: {} rules, at most {MAX_RULES}",
                self.rules.len()
            ));
        }
        let mut total = 0usize;
        for (i, r) in self.rules.iter().enumerate() {
            let ports = !r.source_ports.is_empty() || !r.destination_ports.is_empty();
            if ports && !matches!(r.protocol, Protocol::Tcp | Protocol::Udp) {
                return Err(format!(
                    "rules[{i}]: ports need protocol tcp or udp (it is {:?})",
                    r.protocol
                ));
            }
            if r.expand().is_empty() {
                return Err(format!(
                    "rules[{i}]: matches nothing (its source and destination CIDRs, or its \
                     protocol, are of different IP families)"
                ));
            }
            total += r.expand().len();
        }
        if total > MAX_EXPANDED {
            return Err(format!(
                "rules: {total} kernel rules once each rule's lists are multiplied out, at most \
                 {MAX_EXPANDED}"
            ));
        }
        Ok(self)
    }
}

/// One kernel rule of a [`FirewallRule`]: one element of each list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Atom {
    pub protocol: Protocol,
    pub source: Option<IpNet>,
    pub destination: Option<IpNet>,
    pub source_ports: Option<PortRange>,
    pub destination_ports: Option<PortRange>,
    /// Both CIDRs' family, or the protocol's (ICMP is IPv4, ICMPv6 IPv6).
    pub ipv6: Option<bool>,
}

fn opt<T: Clone>(v: &[T]) -> Vec<Option<T>> {
    if v.is_empty() {
        vec![None]
    } else {
        v.iter().cloned().map(Some).collect()
    }
}

impl FirewallRule {
    /// The product of its lists, without the combinations that cannot
    /// match (an IPv4 source with an IPv6 destination, ICMP to IPv6).
    pub fn expand(&self) -> Vec<Atom> {
        let mut out = Vec::new();
        for source in opt(&self.source_cidrs) {
            for destination in opt(&self.destination_cidrs) {
                let fam = |n: &Option<IpNet>| n.map(|n| matches!(n, IpNet::V6(_)));
                let proto = match self.protocol {
                    Protocol::Icmp => Some(false),
                    Protocol::Icmpv6 => Some(true),
                    _ => None,
                };
                let families: Vec<bool> = [fam(&source), fam(&destination), proto]
                    .into_iter()
                    .flatten()
                    .collect();
                if families.windows(2).any(|w| w[0] != w[1]) {
                    continue;
                }
                for sp in opt(&self.source_ports) {
                    for dp in opt(&self.destination_ports) {
                        out.push(Atom {
                            protocol: self.protocol,
                            source,
                            destination,
                            source_ports: sp,
                            destination_ports: dp,
                            ipv6: families.first().copied(),
                        });
                    }
                }
            }
        }
        out
    }
}

fn de_owner<'de, D: Deserializer<'de>>(d: D) -> Result<Owner, D::Error> {
    let s = String::deserialize(d)?;
    Owner::new(&s).map_err(de::Error::custom)
}

fn de_cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| parse_cidr(s).map_err(de::Error::custom))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FirewallConfig, String> {
        serde_norway::from_str::<FirewallConfig>(text)
            .map_err(|e| e.to_string())
            .and_then(FirewallConfig::resolve)
    }

    #[test]
    fn rules_defaults_and_expansion() {
        let c = parse(
            "rules:\n- action: allow\n  protocol: tcp\n  destinationCidrs: [198.19.0.0/16, 'fd00::/8']\n  destinationPorts: ['8080', '9000-9100']\n",
        )
        .unwrap();
        assert_eq!(c.default_action, Verdict::Deny);
        assert_eq!(c.table.owner.as_str(), DEFAULT_OWNER);
        let atoms = c.rules[0].expand();
        assert_eq!(atoms.len(), 4);
        assert_eq!(atoms[0].ipv6, Some(false));
        assert_eq!(atoms[3].ipv6, Some(true));
        assert_eq!(
            atoms[1].destination_ports,
            Some(PortRange { lo: 9000, hi: 9100 })
        );
    }

    #[test]
    fn bad_rules_say_which_and_why() {
        for (text, want) in [
            ("rules:\n- action: maybe\n", "unknown variant `maybe`"),
            (
                "rules:\n- action: allow\n  destinationCidrs: [300.1.1.1/8]\n",
                "is not a CIDR",
            ),
            (
                "rules:\n- action: allow\n  destinationPorts: ['80']\n",
                "rules[0]: ports need protocol tcp or udp",
            ),
            (
                "rules:\n- action: allow\n  protocol: tcp\n  destinationPorts: ['0']\n",
                "is not a port",
            ),
            (
                "rules:\n- action: allow\n  protocol: icmp\n  destinationCidrs: ['fd00::/8']\n",
                "rules[0]: matches nothing",
            ),
            (
                "rules:\n- action: allow\n  sourceCidrs: [10.0.0.0/8]\n  destinationCidrs: ['fd00::/8']\n",
                "matches nothing",
            ),
            (
                "rules:\n- action: allow\n  port: 80\n",
                "unknown field `port`",
            ),
            (
                "nsmAclFile: /nonexistent/acl.yaml\n",
                "nsmAclFile: cannot read /nonexistent/acl.yaml",
            ),
            ("table:\n  owner: 'bad name'\n", "owner"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let many = format!("rules:\n{}", "- action: deny\n".repeat(MAX_RULES + 1));
        assert!(parse(&many).unwrap_err().contains("at most 256"));
    }
}
