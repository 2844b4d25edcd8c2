//! Shared by the redirect_* suites: backends under test, a pod/peer topology
//! with the usual identity servers, and a snapshot of a namespace's
//! firewall and routing state.

#![allow(dead_code)] // each suite uses a different subset

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use forwarder_plugin::netns::Netns;
use forwarder_plugin::rules::{
    self, Backend, BackendKind, BackendOptions, Fault, Plan, RedirectSpec, Variant,
};
use nsm_tests::netns::TestNetns;
use nsm_tests::topology::{Client, IdentityServer, PodPeer, Reply, any};

/// The backends every behaviour is checked with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Nft,
    /// iptables with the variant detected (iptables-nft in a fresh namespace).
    Iptables,
    IptablesLegacy,
}

pub fn options(kind: Kind) -> BackendOptions {
    BackendOptions {
        iptables_variant: (kind == Kind::IptablesLegacy).then_some(Variant::Legacy),
        ..Default::default()
    }
}

fn kind_of(kind: Kind) -> BackendKind {
    match kind {
        Kind::Nft => BackendKind::Nft,
        Kind::Iptables | Kind::IptablesLegacy => BackendKind::Iptables,
    }
}

pub fn backend(kind: Kind) -> Box<dyn Backend> {
    rules::get_backend(kind_of(kind), options(kind))
}

/// A backend whose applies the kernel refuses at the very end.
pub fn faulty_backend(kind: Kind) -> Box<dyn Backend> {
    let mut o = options(kind);
    o.fault = Some(Fault::RejectLastRule);
    rules::get_backend(kind_of(kind), o)
}

pub fn plan(json: &str) -> Plan {
    Plan::new(&RedirectSpec::parse(json).expect("test spec parses")).expect("test spec is valid")
}

/// Generates one `#[test]` per backend for each named `fn name(kind: Kind)`.
#[macro_export]
macro_rules! per_backend {
    ($($name:ident),* $(,)?) => {
        mod nft {
            $( #[test] fn $name() { super::$name($crate::redirect_common::Kind::Nft) } )*
        }
        mod iptables {
            $( #[test] fn $name() { super::$name($crate::redirect_common::Kind::Iptables) } )*
        }
        mod iptables_legacy {
            $( #[test] fn $name() { super::$name($crate::redirect_common::Kind::IptablesLegacy) } )*
        }
    };
}

/// Pod and peer with identity servers on the ports the suites use, v4 and v6:
/// pod `pod-out` :15001, `pod-in` :15006, `pod-app` :8080 :8081 :15021,
/// `pod-dns` :15053 (UDP and TCP); peer `peer` :8080 :9090, `peer-dns` :53
/// (UDP and TCP).
pub struct Lab {
    pub topo: PodPeer,
    _servers: Vec<IdentityServer>,
}

impl Lab {
    pub fn new() -> Self {
        let topo = PodPeer::new();
        let mut servers = Vec::new();
        for v6 in [false, true] {
            let pod = &topo.pod_ns;
            let peer = &topo.peer_ns;
            for (port, label) in [
                (15001, "pod-out"),
                (15006, "pod-in"),
                (8080, "pod-app"),
                (8081, "pod-app"),
                (15021, "pod-app"),
                (15053, "pod-dns"),
            ] {
                servers.push(IdentityServer::tcp(pod, any(v6, port), label, false));
            }
            // The DNS proxy: owned by the proxy uid (istio's conntrack zone
            // rules key on it) and bound to loopback, where REDIRECT sends
            // locally generated packets.
            let lo = if v6 {
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 15053)
            } else {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 15053)
            };
            servers.push(IdentityServer::udp_owned(pod, lo, "pod-dns", Some(1337)));
            for port in [8080, 9090] {
                servers.push(IdentityServer::tcp(peer, any(v6, port), "peer", false));
            }
            servers.push(IdentityServer::tcp(peer, any(v6, 53), "peer-dns", false));
            servers.push(IdentityServer::udp(peer, any(v6, 53), "peer-dns"));
        }
        Lab {
            topo,
            _servers: servers,
        }
    }

    pub fn pod(&self) -> &Netns {
        &self.topo.pod_ns
    }

    pub fn peer(&self) -> &Netns {
        &self.topo.peer_ns
    }

    /// TCP from the pod as `who`; panics with context on failure.
    pub fn out(&self, who: Client, to: SocketAddr) -> Reply {
        who.tcp(self.pod(), to)
            .unwrap_or_else(|e| panic!("pod {who:?} → {to}: {e}"))
            .0
    }

    /// TCP from the peer into the pod.
    pub fn inbound(&self, to: SocketAddr) -> Reply {
        Client::default()
            .tcp(self.peer(), to)
            .unwrap_or_else(|e| panic!("peer → {to}: {e}"))
            .0
    }

    pub fn udp_out(&self, who: Client, to: SocketAddr) -> Reply {
        who.udp(self.pod(), to)
            .unwrap_or_else(|e| panic!("pod udp {who:?} → {to}: {e}"))
    }
}

/// The app's identity: an ordinary uid/gid.
pub fn app() -> Client {
    Client {
        uid: Some(1000),
        gid: Some(1000),
        ..Default::default()
    }
}

/// Everything of a namespace that rules could change: the nft ruleset, the
/// rules and user chains of both iptables variants and families, ip rules
/// and all routes. Counters and timestamps are left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub nft: String,
    pub xtables: String,
    pub ip_rules: String,
    pub routes: String,
}

/// `argv`'s stdout in `ns`; a tool that fails panics, so that two snapshots
/// that both read nothing never compare equal.
fn out(ns: &TestNetns, argv: &[&str]) -> String {
    let o = ns.exec(argv);
    assert!(
        o.status.success(),
        "{argv:?} in {} failed ({}): {}",
        ns.name(),
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn state(ns: &TestNetns) -> State {
    let mut xtables = String::new();
    for tool in [
        "iptables-nft-save",
        "ip6tables-nft-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ] {
        for line in out(ns, &[tool]).lines() {
            // Rules and user chains only: empty built-in tables are
            // kernel/iptables furniture (legacy tables cannot be removed).
            let builtin = [
                ":PREROUTING",
                ":INPUT",
                ":FORWARD",
                ":OUTPUT",
                ":POSTROUTING",
            ];
            if line.starts_with("-A")
                || (line.starts_with(':') && !builtin.iter().any(|b| line.starts_with(b)))
            {
                xtables.push_str(&format!("{tool}: {line}\n"));
            }
        }
    }
    State {
        nft: strip_counters(&out(ns, &["nft", "list", "ruleset"])),
        xtables,
        ip_rules: out(ns, &["ip", "-4", "rule"]) + &out(ns, &["ip", "-6", "rule"]),
        routes: out(ns, &["ip", "-4", "route", "show", "table", "all"])
            + &out(ns, &["ip", "-6", "route", "show", "table", "all"]),
    }
}

/// iptables-nft rules carry counters, which traffic changes.
fn strip_counters(text: &str) -> String {
    text.lines()
        .map(|l| {
            let mut words: Vec<&str> = l.split(' ').collect();
            while let Some(i) = words.iter().position(|w| *w == "counter") {
                let end = (i + 5).min(words.len());
                words.drain(i..end);
            }
            words.join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The members of our nft interface set (`inet <table> include_ifaces`),
/// `None` when the set does not exist.
pub fn nft_set_members(ns: &TestNetns, table: &str) -> Option<Vec<String>> {
    let out = ns.exec(&["nft", "-j", "list", "set", "inet", table, "include_ifaces"]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft json");
    let set = v["nftables"]
        .as_array()?
        .iter()
        .find_map(|o| o.get("set"))?
        .clone();
    let mut members: Vec<String> = set["elem"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    members.sort();
    Some(members)
}

/// The lines of `b` that `a` lacks (`+`) and of `a` that `b` lacks (`-`),
/// over every part of the state.
pub fn changed_lines(a: &State, b: &State) -> Vec<String> {
    let mut out = Vec::new();
    for (x, y) in [
        (&a.nft, &b.nft),
        (&a.xtables, &b.xtables),
        (&a.ip_rules, &b.ip_rules),
        (&a.routes, &b.routes),
    ] {
        out.extend(
            y.lines()
                .filter(|l| !x.lines().any(|m| m == *l))
                .map(|l| format!("+ {l}")),
        );
        out.extend(
            x.lines()
                .filter(|l| !y.lines().any(|m| m == *l))
                .map(|l| format!("- {l}")),
        );
    }
    out
}

/// Asserts two states are equal, printing only the lines that differ.
#[track_caller]
pub fn assert_same(a: &State, b: &State, what: &str) {
    let mut diff = String::new();
    for (name, x, y) in [
        ("nft", &a.nft, &b.nft),
        ("xtables", &a.xtables, &b.xtables),
        ("ip rules", &a.ip_rules, &b.ip_rules),
        ("routes", &a.routes, &b.routes),
    ] {
        for l in x.lines().filter(|l| !y.lines().any(|m| m == *l)) {
            diff.push_str(&format!("{name} - {l}\n"));
        }
        for l in y.lines().filter(|l| !x.lines().any(|m| m == *l)) {
            diff.push_str(&format!("{name} + {l}\n"));
        }
        if diff.is_empty() && x != y {
            diff.push_str(&format!("{name}: same lines, different order\n"));
        }
    }
    assert!(diff.is_empty(), "{what}:\n{diff}");
}

impl State {
    /// Whether anything of ours (by name, tag or routing protocol) is here.
    pub fn mentions_ours(&self) -> bool {
        let all = format!(
            "{}{}{}{}",
            self.nft, self.xtables, self.ip_rules, self.routes
        );
        all.contains("mesh_proxy")
            || all.contains("MESH_PROXY")
            || all.contains(&format!("proto {}", rules::RT_PROTO))
            || all.contains("lookup 133")
            || all.contains("table 133")
    }
}
