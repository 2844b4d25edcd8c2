//! What our objects are called in the kernel: the owner name gives the nft
//! table, the iptables chain prefix and the tag (rule comment) by which
//! verify and cleanup recognise our rules among foreign ones.

use super::error::RulesError;
use super::plan::{ChainId, ChainRef, Hook, OwnChain, Table};

/// Name of everything we install in one namespace (default `mesh_proxy`:
/// nft table `inet mesh_proxy`, iptables chains `MESH_PROXY_*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner(String);

impl Owner {
    pub const DEFAULT: &'static str = "mesh_proxy";

    /// 1-16 characters `[a-z0-9_]`, starting with a letter: iptables chain
    /// names are at most 28 characters and the longest suffix is
    /// `_IN_REDIRECT`.
    pub fn new(name: &str) -> Result<Owner, RulesError> {
        let ok = (1..=16).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            return Err(RulesError::Owner(name.to_owned()));
        }
        Ok(Owner(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The nft table (family `inet`).
    pub fn nft_table(&self) -> &str {
        &self.0
    }

    /// Prefix of our iptables chains, e.g. `MESH_PROXY`.
    pub fn iptables_prefix(&self) -> String {
        self.0.to_ascii_uppercase()
    }

    /// The comment that marks `rule_key`'s rule as ours: `<owner>:<16 hex>`.
    pub fn tag(&self, rule_key: &str) -> String {
        format!("{}:{:016x}", self.0, fnv1a64(rule_key.as_bytes()))
    }

    /// Whether `comment` is a tag of this owner.
    pub fn owns_tag(&self, comment: &str) -> bool {
        comment
            .strip_prefix(self.0.as_str())
            .and_then(|r| r.strip_prefix(':'))
            .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    }

    /// The own chain an iptables chain name denotes, if it is one of ours.
    pub fn iptables_own_chain(&self, name: &str) -> Option<OwnChain> {
        let rest = name
            .strip_prefix(self.iptables_prefix().as_str())?
            .strip_prefix('_')?;
        ALL_OWN.iter().copied().find(|c| c.suffix() == rest)
    }

    pub fn iptables_chain(&self, id: ChainId) -> String {
        match id.chain {
            ChainRef::Base(Hook::Prerouting) => "PREROUTING".into(),
            ChainRef::Base(Hook::Output) => "OUTPUT".into(),
            ChainRef::Base(Hook::Postrouting) => "POSTROUTING".into(),
            ChainRef::Own(c) => format!("{}_{}", self.iptables_prefix(), c.suffix()),
        }
    }
}

impl Default for Owner {
    fn default() -> Self {
        Owner(Self::DEFAULT.to_owned())
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub const ALL_OWN: [OwnChain; 11] = [
    OwnChain::Inbound,
    OwnChain::Redirect,
    OwnChain::InRedirect,
    OwnChain::Output,
    OwnChain::OutputDns,
    OwnChain::Divert,
    OwnChain::Tproxy,
    OwnChain::Drop,
    OwnChain::Capture,
    OwnChain::Guard,
    OwnChain::Firewall,
];

/// nft chain name inside our table: base chains `NAT_OUTPUT` (upper case,
/// as netavark names its base chains), own chains `nat_output`.
pub fn nft_chain(id: ChainId) -> String {
    match id.chain {
        ChainRef::Base(h) => format!(
            "{}_{}",
            id.table.name().to_ascii_uppercase(),
            match h {
                Hook::Prerouting => "PREROUTING",
                Hook::Output => "OUTPUT",
                Hook::Postrouting => "POSTROUTING",
            }
        ),
        ChainRef::Own(c) => format!("{}_{}", id.table.name(), c.suffix().to_ascii_lowercase()),
    }
}

/// nft base chain type, hook and priority for a base chain, as iptables
/// registers its tables (nat -100, mangle -150, raw -300). Mangle output is
/// a `route` chain so a changed mark re-routes, like iptables' mangle OUTPUT.
pub fn nft_base(id: ChainId) -> Option<(&'static str, Hook, i32)> {
    let ChainRef::Base(hook) = id.chain else {
        return None;
    };
    Some(match (id.table, hook) {
        (Table::Nat, Hook::Postrouting) => ("nat", hook, SNAT_PRIORITY),
        (Table::Nat, h) => ("nat", h, NAT_PRIORITY),
        (Table::Mangle, Hook::Prerouting) => ("filter", hook, MANGLE_PRIORITY),
        (Table::Mangle, Hook::Output) => ("route", hook, MANGLE_PRIORITY),
        (Table::Mangle, Hook::Postrouting) => ("filter", hook, MANGLE_PRIORITY),
        (Table::Raw, h) => ("filter", h, RAW_PRIORITY),
    })
}

/// The nft set of interfaces inbound capture is restricted to
/// (`includeInterfaces`), in our table: `type ifname`.
pub const NFT_INTERFACE_SET: &str = "include_ifaces";

pub const NAT_PRIORITY: i32 = -100;
/// nat POSTROUTING (source NAT), as iptables registers it.
pub const SNAT_PRIORITY: i32 = 100;
pub const MANGLE_PRIORITY: i32 = -150;
pub const RAW_PRIORITY: i32 = -300;

/// 64-bit FNV-1a: a stable content hash for rule tags (not security relevant).
fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_names_are_checked() {
        assert!(Owner::new("mesh_proxy").is_ok());
        assert!(Owner::new("m1").is_ok());
        for bad in ["", "1abc", "Mesh", "a-b", "a b", "seventeen_chars_x", "a;b"] {
            assert!(Owner::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn own_chains_are_recognised_exactly() {
        let mesh = Owner::new("mesh").unwrap();
        let mp = Owner::default();
        assert_eq!(
            mp.iptables_own_chain("MESH_PROXY_IN_REDIRECT"),
            Some(OwnChain::InRedirect)
        );
        // Another owner's chains are not ours even when the prefix matches.
        assert_eq!(mesh.iptables_own_chain("MESH_PROXY_OUTPUT"), None);
        assert_eq!(mp.iptables_own_chain("MESH_PROXY_OTHER"), None);
        let longest = mp.iptables_chain(ChainId {
            table: Table::Nat,
            chain: ChainRef::Own(OwnChain::InRedirect),
        });
        assert!(longest.len() <= 28);
    }

    #[test]
    fn every_own_chain_round_trips() {
        let mp = Owner::default();
        for c in ALL_OWN {
            let id = ChainId {
                table: Table::Mangle,
                chain: ChainRef::Own(c),
            };
            assert_eq!(mp.iptables_own_chain(&mp.iptables_chain(id)), Some(c));
        }
        let fw = ChainId {
            table: Table::Mangle,
            chain: ChainRef::Own(OwnChain::Firewall),
        };
        assert_eq!(mp.iptables_chain(fw), "MESH_PROXY_FIREWALL");
        assert_eq!(nft_chain(fw), "mangle_firewall");
    }

    #[test]
    fn tags_are_stable_and_owned() {
        let mp = Owner::default();
        let t = mp.tag("nat_output return");
        assert_eq!(t, mp.tag("nat_output return"));
        assert_ne!(t, mp.tag("nat_output accept"));
        assert!(mp.owns_tag(&t));
        assert!(!Owner::new("mesh").unwrap().owns_tag(&t));
        assert!(!mp.owns_tag("mesh_proxy:xyz"));
    }
}
