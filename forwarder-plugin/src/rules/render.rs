//! Plan → text: an `nft -f` script and `iptables-restore` documents (what the
//! `render` backend prints, and what the iptables backend feeds to
//! iptables-restore). Every value here was validated by the spec and is
//! written as a single token: nothing needs quoting.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use ipnet::IpNet;

use super::names::{NFT_INTERFACE_SET, Owner, nft_base, nft_chain};
use super::plan::{
    Action, ChainId, ChainRef, CtState, Family, Hook, Match, Plan, Rule, Spelled, Table,
};
use super::spec::Mark;

/// The rule's text in nft syntax, without its comment, e.g.
/// `meta l4proto tcp tcp dport 15020 return`.
pub fn nft_rule_body(rule: &Rule) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(f) = rule.family {
        parts.push(format!("meta nfproto {}", nfproto(f)));
    }
    let l4 = rule_l4(rule);
    for m in &rule.matches {
        match m {
            Match::Proto(p) => parts.push(format!("meta l4proto {}", p.name())),
            Match::Dport(p) => parts.push(format!("{l4} dport {p}")),
            Match::DportRange(lo, hi) => parts.push(format!("{l4} dport {lo}-{hi}")),
            Match::NotDports(v) => parts.extend(v.iter().map(|p| format!("{l4} dport != {p}"))),
            Match::Sport(p) => parts.push(format!("{l4} sport {p}")),
            Match::SportRange(lo, hi) => parts.push(format!("{l4} sport {lo}-{hi}")),
            Match::Daddr(n) => parts.extend(nft_addr("daddr", "", n)),
            Match::NotDaddr(n) => parts.extend(nft_addr("daddr", "!= ", n)),
            Match::Saddr(n) => parts.extend(nft_addr("saddr", "", n)),
            Match::Iif(n) => parts.push(format!("iifname \"{n}\"")),
            Match::IifInSet => parts.push(format!("iifname @{NFT_INTERFACE_SET}")),
            Match::Oif(n) => parts.push(format!("oifname \"{n}\"")),
            Match::Uid(u) => parts.push(format!("meta skuid {u}")),
            Match::NotUid(u) => parts.push(format!("meta skuid != {u}")),
            Match::Gid(g) => parts.push(format!("meta skgid {g}")),
            Match::NotGid(g) => parts.push(format!("meta skgid != {g}")),
            Match::Mark(m) => parts.push(nft_mark(m, "")),
            Match::NotMark(m) => parts.push(nft_mark(m, "!= ")),
            Match::ConnMark(v) => parts.push(format!("ct mark {v:#x}")),
            Match::Ct(CtState::Invalid) => parts.push("ct state invalid".into()),
            Match::Ct(CtState::EstablishedRelated) => {
                parts.push("ct state established,related".into())
            }
            Match::Ct(CtState::New) => parts.push("ct state new".into()),
            Match::ForeignUnicastDaddr => parts.push("fib daddr type unicast".into()),
            Match::LocalDaddr => parts.push("fib daddr type local".into()),
        }
    }
    parts.push(match &rule.action {
        Action::Jump(c) => format!(
            "jump {}",
            nft_chain(ChainId {
                table: rule.chain.table,
                chain: ChainRef::Own(*c),
            })
        ),
        Action::Return => "return".into(),
        Action::Accept => "accept".into(),
        Action::Drop => "drop".into(),
        Action::Redirect(p) => format!("redirect to :{p}"),
        Action::Tproxy { port, mark } => format!(
            "tproxy {} to :{port} meta mark set {mark:#x} accept",
            match rule.family {
                Some(Family::V6) => "ip6",
                _ => "ip",
            }
        ),
        Action::SetMark(v) => format!("meta mark set {v:#x}"),
        Action::CtZone(z) => format!("ct zone set {z}"),
        Action::SaveMark => "ct mark set meta mark".into(),
        Action::RestoreMark => "meta mark set ct mark".into(),
        Action::Masquerade => "masquerade".into(),
        Action::Reject => "reject with icmpx admin-prohibited".into(),
    });
    parts.join(" ")
}

fn nfproto(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

/// The transport protocol a rule's port matches refer to.
pub(crate) fn rule_l4(rule: &Rule) -> &'static str {
    rule.matches
        .iter()
        .find_map(|m| match m {
            Match::Proto(p) => Some(p.name()),
            _ => None,
        })
        .unwrap_or("th")
}

fn nft_addr(field: &str, op: &str, net: &IpNet) -> Option<String> {
    // /0 matches the whole family, which `meta nfproto` already says.
    if net.prefix_len() == 0 {
        return None;
    }
    let proto = match net {
        IpNet::V4(_) => "ip",
        IpNet::V6(_) => "ip6",
    };
    Some(format!("{proto} {field} {op}{net}"))
}

fn nft_mark(m: &Mark, op: &str) -> String {
    if m.mask == u32::MAX {
        format!("meta mark {op}{:#x}", m.value)
    } else {
        format!(
            "meta mark & {:#x} {} {:#x}",
            m.mask,
            if op.is_empty() { "==" } else { "!=" },
            m.value
        )
    }
}

/// What a rule's tag is computed from: its chain and its full text.
pub fn rule_key(rule: &Rule) -> String {
    format!("{} {}", nft_chain(rule.chain), nft_rule_body(rule))
}

/// The `nft -f` script that replaces our table with the plan in one
/// transaction (`add` + `delete` + `add`: the table is fresh even if it
/// existed, and nothing changes if any line fails).
pub fn nft_script(plan: &Plan, owner: &Owner) -> String {
    let t = owner.nft_table();
    let mut s = String::new();
    let _ = writeln!(s, "add table inet {t}");
    let _ = writeln!(s, "delete table inet {t}");
    let _ = writeln!(s, "add table inet {t}");
    if let Some(members) = &plan.interfaces {
        let _ = writeln!(s, "add set inet {t} {NFT_INTERFACE_SET} {{ type ifname; }}");
        if !members.is_empty() {
            let _ = writeln!(
                s,
                "add element inet {t} {NFT_INTERFACE_SET} {{ {} }}",
                nft_elements(members)
            );
        }
    }
    for id in plan.chains() {
        let name = nft_chain(id);
        match nft_base(id) {
            Some((ty, hook, prio)) => {
                let hook = match hook {
                    Hook::Prerouting => "prerouting",
                    Hook::Output => "output",
                    Hook::Postrouting => "postrouting",
                };
                let _ = writeln!(
                    s,
                    "add chain inet {t} {name} {{ type {ty} hook {hook} priority {prio}; policy accept; }}"
                );
            }
            None => {
                let _ = writeln!(s, "add chain inet {t} {name}");
            }
        }
    }
    for r in &plan.rules {
        let _ = writeln!(
            s,
            "add rule inet {t} {} {} comment \"{}\"",
            nft_chain(r.chain),
            nft_rule_body(r),
            owner.tag(&rule_key(r))
        );
    }
    s
}

/// Interface names as nft set elements: `"a", "b"`.
pub fn nft_elements<'a>(names: impl IntoIterator<Item = &'a String>) -> String {
    names
        .into_iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `nft -f` lines of a membership change of the interface set (what
/// [`super::Backend::update_interfaces`] does, as one transaction): adding
/// then deleting `remove` makes removing an absent member a no-op.
pub fn nft_membership_script(owner: &Owner, add: &[String], remove: &[String]) -> String {
    let t = owner.nft_table();
    let mut s = String::new();
    let both: Vec<&String> = add.iter().chain(remove).collect();
    if !both.is_empty() {
        let _ = writeln!(
            s,
            "add element inet {t} {NFT_INTERFACE_SET} {{ {} }}",
            nft_elements(both)
        );
    }
    if !remove.is_empty() {
        let _ = writeln!(
            s,
            "delete element inet {t} {NFT_INTERFACE_SET} {{ {} }}",
            nft_elements(remove)
        );
    }
    s
}

/// Removes our table whether or not it exists.
pub fn nft_cleanup_script(owner: &Owner) -> String {
    let t = owner.nft_table();
    format!("add table inet {t}\ndelete table inet {t}\n")
}

/// The rule's iptables arguments after `-A <chain>`, ending with our
/// comment and the target.
pub fn iptables_rule_args(owner: &Owner, rule: &Rule) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|x| (*x).to_owned()));
    for m in &rule.matches {
        match m {
            Match::Proto(p) => push(&["-p", p.name()]),
            Match::Dport(p) => push(&["--dport", &p.to_string()]),
            Match::DportRange(lo, hi) => push(&["--dport", &format!("{lo}:{hi}")]),
            Match::NotDports(v) if v.len() == 1 => push(&["!", "--dport", &v[0].to_string()]),
            Match::NotDports(v) => {
                // multiport takes at most 15 ports per match; several
                // negated matches in one rule still mean "none of these".
                for chunk in v.chunks(15) {
                    let list: Vec<String> = chunk.iter().map(u16::to_string).collect();
                    push(&["-m", "multiport", "!", "--dports", &list.join(",")]);
                }
            }
            Match::Sport(p) => push(&["--sport", &p.to_string()]),
            Match::SportRange(lo, hi) => push(&["--sport", &format!("{lo}:{hi}")]),
            Match::Daddr(n) => push(&["-d", &n.to_string()]),
            Match::NotDaddr(n) => push(&["!", "-d", &n.to_string()]),
            Match::Saddr(n) => push(&["-s", &n.to_string()]),
            Match::Iif(n) => push(&["-i", n]),
            Match::IifInSet => {
                unreachable!("iptables rules have the interface set spelled out (Plan::for_member)")
            }
            Match::Oif(n) => push(&["-o", n]),
            Match::Uid(u) => push(&["-m", "owner", "--uid-owner", &u.to_string()]),
            Match::NotUid(u) => push(&["-m", "owner", "!", "--uid-owner", &u.to_string()]),
            Match::Gid(g) => push(&["-m", "owner", "--gid-owner", &g.to_string()]),
            Match::NotGid(g) => push(&["-m", "owner", "!", "--gid-owner", &g.to_string()]),
            Match::Mark(m) => push(&["-m", "mark", "--mark", &xt_mark(m)]),
            Match::NotMark(m) => push(&["-m", "mark", "!", "--mark", &xt_mark(m)]),
            Match::ConnMark(v) => push(&["-m", "connmark", "--mark", &format!("{v:#x}")]),
            Match::Ct(CtState::Invalid) => push(&["-m", "conntrack", "--ctstate", "INVALID"]),
            Match::Ct(CtState::EstablishedRelated) => {
                push(&["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"])
            }
            Match::Ct(CtState::New) => push(&["-m", "conntrack", "--ctstate", "NEW"]),
            Match::ForeignUnicastDaddr => push(&["-m", "addrtype", "--dst-type", "UNICAST"]),
            Match::LocalDaddr => push(&["-m", "addrtype", "--dst-type", "LOCAL"]),
        }
    }
    push(&["-m", "comment", "--comment", &owner.tag(&rule_key(rule))]);
    match &rule.action {
        Action::Jump(c) => push(&[
            "-j",
            &owner.iptables_chain(ChainId {
                table: rule.chain.table,
                chain: ChainRef::Own(*c),
            }),
        ]),
        Action::Return => push(&["-j", "RETURN"]),
        Action::Accept => push(&["-j", "ACCEPT"]),
        Action::Drop => push(&["-j", "DROP"]),
        Action::Redirect(p) => push(&["-j", "REDIRECT", "--to-ports", &p.to_string()]),
        Action::Tproxy { port, mark } => push(&[
            "-j",
            "TPROXY",
            "--on-port",
            &port.to_string(),
            "--tproxy-mark",
            &format!("{mark:#x}/0xffffffff"),
        ]),
        Action::SetMark(v) => push(&["-j", "MARK", "--set-mark", &format!("{v:#x}")]),
        Action::CtZone(z) => push(&["-j", "CT", "--zone", &z.to_string()]),
        Action::SaveMark => push(&["-j", "CONNMARK", "--save-mark"]),
        Action::RestoreMark => push(&["-j", "CONNMARK", "--restore-mark"]),
        Action::Masquerade => push(&["-j", "MASQUERADE"]),
        // REJECT is valid only in the filter table's chains.
        Action::Reject => push(&["-j", "DROP"]),
    }
    a
}

fn xt_mark(m: &Mark) -> String {
    if m.mask == u32::MAX {
        format!("{:#x}", m.value)
    } else {
        m.to_string()
    }
}

/// One table's part of an iptables-restore document.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreTable {
    /// `:CHAIN - [0:0]`: creates the chain, or flushes it if it exists.
    pub declare: Vec<String>,
    /// `-D CHAIN …` lines (rule text as iptables-save printed it).
    pub delete_rules: Vec<String>,
    /// `-A CHAIN …` lines.
    pub append: Vec<String>,
    /// `-X CHAIN`: after everything referring to it is gone.
    pub delete_chains: Vec<String>,
}

/// An iptables-restore (`--noflush`) document, tables in iptables-save's
/// order; each table is committed as one unit by iptables-restore.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreDoc {
    pub tables: BTreeMap<Table, RestoreTable>,
}

impl RestoreDoc {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        for (table, t) in &self.tables {
            let _ = writeln!(s, "*{}", table.name());
            for c in &t.declare {
                let _ = writeln!(s, ":{c} - [0:0]");
            }
            for l in &t.delete_rules {
                let _ = writeln!(s, "-D {l}");
            }
            for l in &t.append {
                let _ = writeln!(s, "-A {l}");
            }
            for c in &t.delete_chains {
                let _ = writeln!(s, "-X {c}");
            }
            let _ = writeln!(s, "COMMIT");
        }
        s
    }
}

/// The document that installs the plan's `family` rules into a namespace
/// holding nothing of ours.
pub fn iptables_restore(plan: &Plan, owner: &Owner, family: Family) -> RestoreDoc {
    let mut doc = RestoreDoc::default();
    if family == Family::V6 && !plan.ipv6 {
        return doc;
    }
    for id in plan.chains() {
        let t = doc.tables.entry(id.table).or_default();
        if let ChainRef::Own(_) = id.chain {
            t.declare.push(owner.iptables_chain(id));
        }
    }
    for Spelled { rule: r, .. } in &plan.rules_with_members(family) {
        let line = format!(
            "{} {}",
            owner.iptables_chain(r.chain),
            iptables_rule_args(owner, r).join(" ")
        );
        doc.tables
            .entry(r.chain.table)
            .or_default()
            .append
            .push(line);
    }
    doc
}

/// The `iptables-restore --noflush` document of a membership change of the
/// plan's interface set for `family`: each member rule of `add` appended,
/// each of `remove` deleted (the iptables backend writes only the appends
/// that are missing and the deletions that are present).
pub fn iptables_membership(
    plan: &Plan,
    owner: &Owner,
    family: Family,
    add: &[String],
    remove: &[String],
) -> RestoreDoc {
    let mut doc = RestoreDoc::default();
    if family == Family::V6 && !plan.ipv6 {
        return doc;
    }
    for template in plan.rules_for(family).filter(|r| r.uses_interface_set()) {
        let chain = owner.iptables_chain(template.chain);
        let line = |name: &String| {
            let r = Plan::for_member(template, name);
            format!("{chain} {}", iptables_rule_args(owner, &r).join(" "))
        };
        let t = doc.tables.entry(template.chain.table).or_default();
        t.append.extend(add.iter().map(line));
        t.delete_rules.extend(remove.iter().map(line));
    }
    doc.tables
        .retain(|_, t| !t.append.is_empty() || !t.delete_rules.is_empty());
    doc
}

/// The same rules as one `iptables`/`ip6tables` argv per chain and rule, as
/// linkerd's proxy-init applies them (for the benchmark's comparison).
pub fn iptables_argv(plan: &Plan, owner: &Owner, family: Family) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    if family == Family::V6 && !plan.ipv6 {
        return out;
    }
    for id in plan.chains() {
        if let ChainRef::Own(_) = id.chain {
            out.push(vec![
                "-t".into(),
                id.table.name().into(),
                "-N".into(),
                owner.iptables_chain(id),
            ]);
        }
    }
    for Spelled { rule: r, .. } in &plan.rules_with_members(family) {
        let mut argv = vec![
            "-t".into(),
            r.chain.table.name().into(),
            "-A".into(),
            owner.iptables_chain(r.chain),
        ];
        argv.extend(iptables_rule_args(owner, r));
        out.push(argv);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::spec::{Mode, RedirectSpec};

    #[test]
    fn default_nft_script_has_istio_shape() {
        let plan = Plan::new(&RedirectSpec::default()).unwrap();
        let s = nft_script(&plan, &Owner::default());
        assert!(s.starts_with("add table inet mesh_proxy\ndelete table inet mesh_proxy\n"));
        assert!(s.contains(
            "add chain inet mesh_proxy NAT_OUTPUT { type nat hook output priority -100; policy accept; }"
        ));
        assert!(s.contains("add rule inet mesh_proxy nat_redirect meta l4proto tcp redirect to :15001 comment \"mesh_proxy:"));
        assert!(s.contains("nat_output meta nfproto ipv4 oifname \"lo\" ip daddr != 127.0.0.1/32 meta l4proto tcp tcp dport != 15008 tcp dport != 15020 tcp dport != 15021 tcp dport != 15090 meta skuid 1337 jump nat_in_redirect"), "{s}");
        assert!(!s.contains("ip6"));
    }

    #[test]
    fn default_iptables_doc_mirrors_istio_basic_golden() {
        let plan = Plan::new(&RedirectSpec::default()).unwrap();
        let owner = Owner::default();
        let text = iptables_restore(&plan, &owner, Family::V4).text();
        let strip = |l: &str| {
            // drop the comment match to compare with istio's text
            let mut t: Vec<&str> = l.split(' ').collect();
            if let Some(i) = t.iter().position(|x| *x == "comment") {
                t.drain(i - 1..i + 3);
            }
            t.join(" ")
        };
        let lines: Vec<String> = text.lines().map(strip).collect();
        for want in [
            "*nat",
            ":MESH_PROXY_INBOUND - [0:0]",
            "-A PREROUTING -p tcp -j MESH_PROXY_INBOUND",
            "-A MESH_PROXY_INBOUND -p tcp --dport 15021 -j RETURN",
            "-A MESH_PROXY_INBOUND -p tcp -j MESH_PROXY_IN_REDIRECT",
            // istio's golden jumps with every protocol; only TCP is ever
            // redirected here (no DNS capture), so only TCP pays for the chain.
            "-A OUTPUT -p tcp -j MESH_PROXY_OUTPUT",
            "-A MESH_PROXY_OUTPUT -p udp --dport 15020 -j RETURN",
            "-A MESH_PROXY_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
            "-A MESH_PROXY_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 15008,15020,15021,15090 -m owner --uid-owner 1337 -j MESH_PROXY_IN_REDIRECT",
            "-A MESH_PROXY_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
            "-A MESH_PROXY_OUTPUT -m owner --gid-owner 1337 -j RETURN",
            "-A MESH_PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "-A MESH_PROXY_OUTPUT -j MESH_PROXY_REDIRECT",
            "-A MESH_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A MESH_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "COMMIT",
        ] {
            assert!(
                lines.iter().any(|l| l == want),
                "missing {want:?} in\n{text}"
            );
        }
        assert!(iptables_restore(&plan, &owner, Family::V6).is_empty());
    }

    #[test]
    fn tproxy_renders_in_both_formats() {
        let spec = RedirectSpec {
            mode: Mode::Tproxy,
            ipv6: true,
            ..Default::default()
        };
        let plan = Plan::new(&spec).unwrap();
        let owner = Owner::default();
        let nft = nft_script(&plan, &owner);
        assert!(nft.contains("tproxy ip6 to :15006 meta mark set 0x539 accept"));
        assert!(nft.contains("MANGLE_OUTPUT { type route hook output priority -150;"));
        let v6 = iptables_restore(&plan, &owner, Family::V6).text();
        assert!(v6.contains("-j TPROXY --on-port 15006 --tproxy-mark 0x539/0xffffffff"));
        assert!(v6.contains("! -d ::1/128"));
        assert!(!v6.contains("127.0.0.1"));
    }

    #[test]
    fn interface_sets_render_as_a_set_and_membership_as_elements_or_rules() {
        let owner = Owner::default();
        let spec = RedirectSpec {
            include_outbound_cidrs: crate::rules::spec::Selection::List(vec![]),
            ..Default::default()
        };
        let empty = Plan::for_interfaces(&spec, []).unwrap();
        let s = nft_script(&empty, &owner);
        assert!(s.contains("add set inet mesh_proxy include_ifaces { type ifname; }\n"));
        assert!(
            !s.contains("add element"),
            "no element line for an empty set"
        );
        assert!(s.contains("NAT_PREROUTING meta nfproto ipv4 iifname @include_ifaces"));
        let one = Plan::for_interfaces(&spec, ["nsm-a".to_owned()]).unwrap();
        assert!(
            nft_script(&one, &owner)
                .contains("add element inet mesh_proxy include_ifaces { \"nsm-a\" }\n")
        );

        assert_eq!(
            nft_membership_script(&owner, &["nsm-a".into()], &["nsm-b".into()]),
            "add element inet mesh_proxy include_ifaces { \"nsm-a\", \"nsm-b\" }\n\
             delete element inet mesh_proxy include_ifaces { \"nsm-b\" }\n"
        );
        let doc = iptables_membership(&empty, &owner, Family::V4, &["nsm-a".into()], &[]).text();
        assert!(
            doc.contains("-A PREROUTING -i nsm-a -p tcp -m comment --comment mesh_proxy:"),
            "{doc}"
        );
        let doc = iptables_membership(&empty, &owner, Family::V4, &[], &["nsm-b".into()]).text();
        assert!(doc.contains("-D PREROUTING -i nsm-b -p tcp"), "{doc}");
        assert!(
            iptables_membership(&empty, &owner, Family::V6, &["nsm-a".into()], &[]).is_empty(),
            "no IPv6 rules without ipv6"
        );
        // A full document spells the members out.
        let doc = iptables_restore(&one, &owner, Family::V4).text();
        assert!(doc.contains("-A PREROUTING -i nsm-a -p tcp"), "{doc}");
    }

    /// A firewall's shape: mangle base chains jumping to an own chain that
    /// holds each of the newer matches.
    fn firewall_plan() -> Plan {
        use super::super::plan::{L4, OwnChain};
        let rule = |chain, family, matches, action| Rule {
            chain,
            family,
            matches,
            action,
        };
        let base = |hook| ChainId {
            table: Table::Mangle,
            chain: ChainRef::Base(hook),
        };
        let fw = ChainId {
            table: Table::Mangle,
            chain: ChainRef::Own(OwnChain::Firewall),
        };
        Plan {
            ipv6: true,
            rules: vec![
                rule(
                    base(Hook::Prerouting),
                    None,
                    vec![Match::IifInSet],
                    Action::Jump(OwnChain::Firewall),
                ),
                rule(
                    base(Hook::Postrouting),
                    None,
                    vec![Match::Oif("fw-b".into())],
                    Action::Jump(OwnChain::Firewall),
                ),
                rule(
                    fw,
                    Some(Family::V4),
                    vec![Match::Proto(L4::Icmp), Match::LocalDaddr],
                    Action::Return,
                ),
                rule(
                    fw,
                    Some(Family::V6),
                    vec![Match::Proto(L4::Icmpv6)],
                    Action::Return,
                ),
                rule(
                    fw,
                    None,
                    vec![Match::Proto(L4::Tcp), Match::SportRange(1000, 2000)],
                    Action::Drop,
                ),
            ],
            policy_routes: vec![],
            interfaces: Some(["fw-a".to_owned()].into()),
        }
    }

    #[test]
    fn firewall_matches_render_in_nft_text() {
        let s = nft_script(&firewall_plan(), &Owner::new("fw").unwrap());
        for want in [
            "add chain inet fw MANGLE_POSTROUTING { type filter hook postrouting priority -150; policy accept; }",
            "add chain inet fw mangle_firewall\n",
            "add rule inet fw MANGLE_PREROUTING iifname @include_ifaces jump mangle_firewall comment",
            "add rule inet fw MANGLE_POSTROUTING oifname \"fw-b\" jump mangle_firewall comment",
            "add rule inet fw mangle_firewall meta nfproto ipv4 meta l4proto icmp fib daddr type local return comment",
            "add rule inet fw mangle_firewall meta nfproto ipv6 meta l4proto ipv6-icmp return comment",
            "add rule inet fw mangle_firewall meta l4proto tcp tcp sport 1000-2000 drop comment",
        ] {
            assert!(s.contains(want), "missing {want:?} in\n{s}");
        }
    }

    #[test]
    fn firewall_matches_render_as_iptables_args() {
        let plan = firewall_plan();
        let owner = Owner::new("fw").unwrap();
        let v4 = iptables_restore(&plan, &owner, Family::V4).text();
        let v6 = iptables_restore(&plan, &owner, Family::V6).text();
        for (doc, want) in [
            (&v4, ":FW_FIREWALL - [0:0]"),
            (&v4, "-A PREROUTING -i fw-a -m comment --comment fw:"),
            (&v4, "-A POSTROUTING -o fw-b -m comment --comment fw:"),
            (
                &v4,
                "-A FW_FIREWALL -p icmp -m addrtype --dst-type LOCAL -m comment",
            ),
            (&v6, "-A FW_FIREWALL -p ipv6-icmp -m comment"),
            (&v4, "-A FW_FIREWALL -p tcp --sport 1000:2000 -m comment"),
            (&v6, "-A FW_FIREWALL -p tcp --sport 1000:2000 -m comment"),
        ] {
            assert!(doc.contains(want), "missing {want:?} in\n{doc}");
        }
        assert!(v4.contains("-j FW_FIREWALL") && v4.starts_with("*mangle\n"));
        assert!(!v4.contains("ipv6-icmp") && !v6.contains("-p icmp "));
        assert_eq!(
            owner.iptables_own_chain("FW_FIREWALL"),
            Some(super::super::plan::OwnChain::Firewall)
        );
    }

    #[test]
    fn argv_has_one_command_per_chain_and_rule() {
        let plan = Plan::new(&RedirectSpec::default()).unwrap();
        let argv = iptables_argv(&plan, &Owner::default(), Family::V4);
        let chains = plan
            .chains()
            .iter()
            .filter(|c| matches!(c.chain, ChainRef::Own(_)))
            .count();
        assert_eq!(argv.len(), chains + plan.rules.len());
    }
}
