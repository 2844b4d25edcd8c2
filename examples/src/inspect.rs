//! What a namespace holds — links, addresses, routes, policy rules and
//! firewall rules — as a comparable snapshot, read with the ordinary tools
//! (`ip -j`, `nft`, `iptables-legacy-save`) so what the demo prints is what
//! a user would see.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::namespace::{Namespace, NamespaceError};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error("unexpected output of {what} in {ns}: {why}")]
    Parse {
        ns: String,
        what: &'static str,
        why: String,
    },
}

/// A link as `ip -j link` shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub up: bool,
}

/// Everything in a namespace a connection could have added. Two snapshots
/// are equal when nothing was left behind (or nothing was added).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NsState {
    /// `name` of every link.
    pub links: BTreeSet<String>,
    /// `dev address/prefix` of every address.
    pub addrs: BTreeSet<String>,
    /// Every route of every table, v4 and v6, as `ip route` prints it.
    pub routes: BTreeSet<String>,
    /// Policy routing rules, v4 and v6.
    pub rules: BTreeSet<String>,
    /// `nft list ruleset` (includes iptables-nft rules), one entry per line.
    pub nft: BTreeSet<String>,
    /// `iptables-legacy-save` rule lines, when that tool exists.
    pub iptables_legacy: BTreeSet<String>,
}

impl NsState {
    /// Lines saying what `after` has that `self` has not (`+`) and the reverse (`-`).
    pub fn diff(&self, after: &NsState) -> Vec<String> {
        let mut out = Vec::new();
        let sets: [(&str, &BTreeSet<String>, &BTreeSet<String>); 6] = [
            ("link", &self.links, &after.links),
            ("address", &self.addrs, &after.addrs),
            ("route", &self.routes, &after.routes),
            ("ip rule", &self.rules, &after.rules),
            ("nft", &self.nft, &after.nft),
            (
                "iptables-legacy",
                &self.iptables_legacy,
                &after.iptables_legacy,
            ),
        ];
        for (what, a, b) in sets {
            out.extend(b.difference(a).map(|x| format!("+ {what} {x}")));
            out.extend(a.difference(b).map(|x| format!("- {what} {x}")));
        }
        out
    }

    /// Whether any nftables table exists.
    pub fn has_nft_tables(&self) -> bool {
        self.nft.iter().any(|l| l.starts_with("table "))
    }
}

fn json(ns: &Namespace, what: &'static str, argv: &[&str]) -> Result<Vec<Value>, InspectError> {
    let out = ns.exec(argv)?;
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_str(&out).map_err(|e| InspectError::Parse {
        ns: ns.name().to_owned(),
        what,
        why: e.to_string(),
    })?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn lines(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// Every link of `ns`.
pub fn links(ns: &Namespace) -> Result<Vec<LinkInfo>, InspectError> {
    let mut out = Vec::new();
    for l in json(ns, "ip -j link", &["ip", "-j", "link", "show"])? {
        let name = l["ifname"].as_str().unwrap_or_default().to_owned();
        let index = l["ifindex"].as_u64().unwrap_or_default() as u32;
        let up = l["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "UP"));
        out.push(LinkInfo { index, name, up });
    }
    Ok(out)
}

/// Waits until link `name` in `ns` is operationally up. The kernel reports
/// a veth's carrier change lazily (linkwatch may take up to a second), so a
/// freshly made link can work yet still read DOWN for a moment.
pub fn wait_oper_up(
    ns: &Namespace,
    name: &str,
    timeout: std::time::Duration,
) -> Result<bool, InspectError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let links = json(ns, "ip -j link", &["ip", "-j", "link", "show", "dev", name])?;
        if links.iter().any(|l| l["operstate"] == "UP") {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The link called `name`, if any.
pub fn link(ns: &Namespace, name: &str) -> Result<Option<LinkInfo>, InspectError> {
    Ok(links(ns)?.into_iter().find(|l| l.name == name))
}

/// `address/prefix` of every address on `dev` (link-local ones too).
pub fn addresses(ns: &Namespace, dev: &str) -> Result<Vec<String>, InspectError> {
    let mut out = Vec::new();
    for l in json(ns, "ip -j addr", &["ip", "-j", "addr", "show", "dev", dev])? {
        for a in l["addr_info"].as_array().into_iter().flatten() {
            if let (Some(ip), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
                out.push(format!("{ip}/{len}"));
            }
        }
    }
    Ok(out)
}

/// Routes of the main table that go through `dev`, as `ip route` prints them.
pub fn routes_via(ns: &Namespace, dev: &str) -> Result<Vec<String>, InspectError> {
    let v4 = ns.exec(&["ip", "-4", "route", "show", "dev", dev])?;
    let v6 = ns.exec(&["ip", "-6", "route", "show", "dev", dev])?;
    Ok(v4
        .lines()
        .chain(v6.lines())
        .map(|l| l.trim().to_owned())
        .collect())
}

/// `ip -br link` of `ns`, for people.
pub fn brief_links(ns: &Namespace) -> Result<String, InspectError> {
    Ok(ns.exec(&["ip", "-br", "link"])?)
}

/// `ip -br addr` of `ns`, for people.
pub fn brief_addrs(ns: &Namespace) -> Result<String, InspectError> {
    Ok(ns.exec(&["ip", "-br", "addr"])?)
}

/// `nft list ruleset` of `ns`.
pub fn nft_ruleset(ns: &Namespace) -> Result<String, InspectError> {
    Ok(ns.exec(&["nft", "list", "ruleset"])?)
}

/// The processes in the named namespace (`ip netns pids`); none if it
/// cannot be listed.
pub fn pids_in(ns_name: &str) -> Vec<u32> {
    std::process::Command::new("ip")
        .args(["netns", "pids", ns_name])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The processes in the named namespace whose command line contains `needle`.
pub fn pids_running(ns_name: &str, needle: &str) -> Vec<u32> {
    pids_in(ns_name)
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// The effective uid of process `pid`.
/// The environment of process `pid`, one `KEY=value` a line (empty when
/// it is gone).
pub fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

pub fn uid(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn have(tool: &str) -> bool {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| std::path::Path::new(d).join(tool).is_file())
}

/// A snapshot of everything in `ns` a connection could have added.
pub fn snapshot(ns: &Namespace) -> Result<NsState, InspectError> {
    let mut s = NsState {
        links: links(ns)?.into_iter().map(|l| l.name).collect(),
        ..Default::default()
    };
    for l in json(ns, "ip -j addr", &["ip", "-j", "addr", "show"])? {
        let dev = l["ifname"].as_str().unwrap_or_default();
        for a in l["addr_info"].as_array().into_iter().flatten() {
            if let (Some(ip), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
                s.addrs.insert(format!("{dev} {ip}/{len}"));
            }
        }
    }
    for fam in ["-4", "-6"] {
        s.routes.extend(lines(
            &ns.exec(&["ip", fam, "route", "show", "table", "all"])?,
        ));
        s.rules
            .extend(lines(&ns.exec(&["ip", fam, "rule", "show"])?));
    }
    s.nft = lines(&nft_ruleset(ns)?);
    if have("iptables-legacy-save") {
        for tool in ["iptables-legacy-save", "ip6tables-legacy-save"] {
            if have(tool) {
                // Counters and the "generated by" comments change by themselves.
                let text = ns.exec(&[tool])?;
                s.iptables_legacy.extend(
                    lines(&text)
                        .into_iter()
                        .filter(|l| l.starts_with('-') || l.starts_with('*')),
                );
            }
        }
    }
    Ok(s)
}

/// The NSE's redirect table (mesh-proxy-nse's default owner).
pub const NSE_TABLE: &str = "mesh_proxy_nse";

/// Waits up to `timeout` for the endpoint's namespace to be back to
/// `before`, its idle table aside ([`diff_but_idle_nse_table`]); Err with
/// what is still different.
pub fn wait_nse_back_to(
    ns: &Namespace,
    before: &NsState,
    timeout: std::time::Duration,
) -> Result<(), Vec<String>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = match snapshot(ns) {
            Ok(after) => match diff_but_idle_nse_table(ns, before, &after) {
                Ok(d) if d.is_empty() => return Ok(()),
                Ok(d) => d,
                Err(e) => vec![e],
            },
            Err(e) => vec![e.to_string()],
        };
        if std::time::Instant::now() >= deadline {
            return Err(left);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// What changed between `before` and `after` in the endpoint's namespace,
/// leaving out the NSE's idle redirect table: after its last Close the NSE
/// keeps that table for the next connection, with an empty interface set, so
/// it captures nothing (nse/README.md). Err if the set still has members.
pub fn diff_but_idle_nse_table(
    ns: &Namespace,
    before: &NsState,
    after: &NsState,
) -> Result<Vec<String>, String> {
    let table = ns
        .exec(&["nft", "list", "table", "inet", NSE_TABLE])
        .unwrap_or_default();
    let ours: BTreeSet<&str> = table.lines().map(str::trim).collect();
    if ours.iter().any(|l| l.starts_with("elements")) {
        return Err(format!(
            "the NSE's interface set still has members:\n{table}"
        ));
    }
    Ok(before
        .diff(after)
        .into_iter()
        .filter(|d| {
            !d.strip_prefix("+ nft ")
                .is_some_and(|l| ours.contains(l.trim()))
        })
        .collect())
}
