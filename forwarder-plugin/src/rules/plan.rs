//! Spec → backend-neutral rule list. The rule order and shape follow
//! istio-iptables (`tools/istio-iptables/pkg/capture/run.go`): every backend
//! renders this one list, so nft and iptables always agree.

use std::collections::BTreeSet;

use ipnet::IpNet;

use super::error::RulesError;
use super::names::nft_chain;
use super::render::nft_rule_body;
use super::spec::{
    Mark as MarkMask, Mode, OUTBOUND_MARK, Port, RedirectSpec, Selection, SpecError,
    validate_interface,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Loopback destination that is never redirected (istio `HostIPv4LoopbackCidr`).
    fn localhost(self) -> IpNet {
        match self {
            Family::V4 => "127.0.0.1/32".parse().expect("literal"),
            Family::V6 => "::1/128".parse().expect("literal"),
        }
    }

    /// Source the proxy uses to reach the app in inbound passthrough (istio
    /// binds 127.0.0.6 / ::6).
    fn passthrough_source(self) -> IpNet {
        match self {
            Family::V4 => "127.0.0.6/32".parse().expect("literal"),
            Family::V6 => "::6/128".parse().expect("literal"),
        }
    }

    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
}

/// The netfilter table a chain belongs to (iptables tables; nft chain
/// type + priority).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Mangle,
    Nat,
    Raw,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Raw => "raw",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    Prerouting,
    Output,
    /// After routing: source NAT (nat) or a firewall's last look (mangle).
    Postrouting,
}

/// Chains we own (besides the base chains of each hook).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OwnChain {
    Inbound,
    Redirect,
    InRedirect,
    Output,
    OutputDns,
    Divert,
    Tproxy,
    Drop,
    /// Client-side capture ([`super::capture`]): marks what goes to the endpoint.
    Capture,
    /// Endpoint guard ([`Plan::with_endpoint_guard`]): what a client link may not send.
    Guard,
    /// Firewall rules, jumped to from a mangle base chain.
    Firewall,
}

impl OwnChain {
    pub fn suffix(self) -> &'static str {
        match self {
            OwnChain::Inbound => "INBOUND",
            OwnChain::Redirect => "REDIRECT",
            OwnChain::InRedirect => "IN_REDIRECT",
            OwnChain::Output => "OUTPUT",
            OwnChain::OutputDns => "OUTPUT_DNS",
            OwnChain::Divert => "DIVERT",
            OwnChain::Tproxy => "TPROXY",
            OwnChain::Drop => "DROP",
            OwnChain::Capture => "CAPTURE",
            OwnChain::Guard => "GUARD",
            OwnChain::Firewall => "FIREWALL",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChainRef {
    /// The hook's base chain (iptables: the built-in PREROUTING/OUTPUT).
    Base(Hook),
    Own(OwnChain),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChainId {
    pub table: Table,
    pub chain: ChainRef,
}

/// A transport protocol. Only TCP and UDP have ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L4 {
    Tcp,
    Udp,
    Icmp,
    /// ICMPv6 (IPv6 rules only, like [`L4::Icmp`] is for IPv4).
    Icmpv6,
}

impl L4 {
    /// The protocol's name as nft and iptables spell it.
    pub fn name(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
            L4::Icmp => "icmp",
            L4::Icmpv6 => "ipv6-icmp",
        }
    }

    /// Whether port matches can follow a [`Match::Proto`] of it.
    pub fn has_ports(self) -> bool {
        match self {
            L4::Tcp | L4::Udp => true,
            L4::Icmp | L4::Icmpv6 => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CtState {
    Invalid,
    EstablishedRelated,
    /// The first packet of a connection (conntrack NEW).
    New,
}

/// One condition of a rule. Port matches need a [`Match::Proto`] of TCP or
/// UDP before them in the same rule: nft would read an ICMP header's bytes
/// as ports, so backends refuse port matches after ICMP ([`Plan::check`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    Proto(L4),
    Dport(u16),
    /// The destination port is in `lo..=hi` (`lo < hi`).
    DportRange(u16, u16),
    /// The destination port is none of these.
    NotDports(Vec<u16>),
    Sport(u16),
    /// The source port is in `lo..=hi` (`lo < hi`).
    SportRange(u16, u16),
    Daddr(IpNet),
    NotDaddr(IpNet),
    Saddr(IpNet),
    Iif(String),
    /// Arrived on a member of the plan's interface set ([`Plan::interfaces`],
    /// `includeInterfaces`). nft tests membership of a named set, so members
    /// come and go without touching any rule; iptables has no interface sets
    /// and installs one rule per member instead ([`Plan::for_member`]).
    IifInSet,
    Oif(String),
    Uid(u32),
    NotUid(u32),
    Gid(u32),
    NotGid(u32),
    Mark(MarkMask),
    NotMark(MarkMask),
    ConnMark(u32),
    Ct(CtState),
    /// The destination is a unicast address of another host — not one of
    /// ours, not multicast or broadcast (nft `fib daddr type unicast`,
    /// iptables `addrtype --dst-type UNICAST`).
    ForeignUnicastDaddr,
    /// The destination is an address of this host (nft `fib daddr type
    /// local`, iptables `addrtype --dst-type LOCAL`).
    LocalDaddr,
}

impl Match {
    /// Whether this is a match on ports (needs TCP or UDP).
    pub fn is_port(&self) -> bool {
        matches!(
            self,
            Match::Dport(_)
                | Match::DportRange(..)
                | Match::NotDports(_)
                | Match::Sport(_)
                | Match::SportRange(..)
        )
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    Jump(OwnChain),
    Return,
    Accept,
    Drop,
    /// NAT to this port on the local host (iptables REDIRECT).
    Redirect(u16),
    /// TPROXY to this port, marking the packet (the rule's family says ip/ip6).
    Tproxy {
        port: u16,
        mark: u32,
    },
    SetMark(u32),
    CtZone(u16),
    /// Copy the packet mark to the connection (CONNMARK --save-mark).
    SaveMark,
    /// Copy the connection mark to the packet (CONNMARK --restore-mark).
    RestoreMark,
    /// Source NAT to the outgoing interface's address (nat POSTROUTING).
    Masquerade,
    /// Refuse with ICMP administratively prohibited (nft `reject with icmpx
    /// admin-prohibited`). iptables allows REJECT only in the filter table,
    /// so its backend drops instead.
    Reject,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub chain: ChainId,
    /// `None`: both families (whichever reach the chain); `Some`: only this one.
    pub family: Option<Family>,
    pub matches: Vec<Match>,
    pub action: Action,
}

/// Policy routing TPROXY needs: `ip rule fwmark <mark> lookup <table>` and a
/// local default route in that table, per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRoute {
    pub family: Family,
    pub mark: u32,
    pub table: u32,
}

impl Rule {
    /// Whether the rule matches membership of the interface set.
    pub fn uses_interface_set(&self) -> bool {
        self.matches.contains(&Match::IifInSet)
    }

    /// Why the backends cannot install the rule as meant, if they cannot.
    /// Port matches after ICMP: nft would compare ICMP header bytes (the
    /// same offsets as ports) and match silently wrong. Empty port ranges:
    /// nft would match nothing.
    pub fn check(&self) -> Result<(), String> {
        let portless = self.matches.iter().find_map(|m| match m {
            Match::Proto(p) if !p.has_ports() => Some(*p),
            _ => None,
        });
        for m in &self.matches {
            if let Some(p) = portless
                && m.is_port()
            {
                return Err(format!(
                    "{} has no ports: port matches need tcp or udp",
                    p.name()
                ));
            }
            if let Match::DportRange(lo, hi) | Match::SportRange(lo, hi) = m
                && lo >= hi
            {
                return Err(format!("port range {lo}-{hi}: needs lo < hi"));
            }
        }
        Ok(())
    }
}

/// A rule of [`Plan::rules_with_members`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spelled {
    pub rule: Rule,
    /// The interface-set member this rule was spelled out for.
    pub member: Option<String>,
}

/// Everything one spec asks of a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub ipv6: bool,
    pub rules: Vec<Rule>,
    pub policy_routes: Vec<PolicyRoute>,
    /// The interface set's members when inbound capture is restricted to
    /// listed interfaces (`includeInterfaces`), `None` when every interface
    /// is captured. Rules test membership with [`Match::IifInSet`]; the
    /// members can change without touching them
    /// ([`super::Backend::update_interfaces`]).
    pub interfaces: Option<BTreeSet<String>>,
}

impl Plan {
    /// Validates `spec` and derives its rules.
    pub fn new(spec: &RedirectSpec) -> Result<Plan, SpecError> {
        spec.validate()?;
        let set = (!spec.include_interfaces.is_empty())
            .then(|| spec.include_interfaces.iter().cloned().collect());
        Ok(Self::build(&spec.normalized(), set))
    }

    /// The plan of `spec` with inbound capture restricted to an interface
    /// set holding `interfaces` — also when there are none, which captures
    /// nothing inbound until members are added (an empty
    /// `includeInterfaces` means every interface instead). Replaces
    /// `spec.include_interfaces`. What an endpoint uses whose connections'
    /// interfaces come and go: the rules stay, only the set changes. Whether
    /// `lo` is a member shapes the rules (the proxy's hairpin), so `lo` is
    /// set here and never by a membership change.
    pub fn for_interfaces(
        spec: &RedirectSpec,
        interfaces: impl IntoIterator<Item = String>,
    ) -> Result<Plan, SpecError> {
        let set: BTreeSet<String> = interfaces.into_iter().collect();
        for name in &set {
            validate_interface(name).map_err(|why| SpecError::Interface {
                field: "includeInterfaces",
                why,
            })?;
        }
        let mut spec = spec.clone();
        spec.include_interfaces = Vec::new();
        spec.validate()?;
        Ok(Self::build(&spec.normalized(), Some(set)))
    }

    /// Whether every rule can be installed as meant ([`Rule::check`]).
    /// Backends check before they write anything: plans are also built by
    /// hand, not only from a validated spec.
    pub fn check(&self) -> Result<(), RulesError> {
        for r in &self.rules {
            r.check().map_err(|why| {
                RulesError::Plan(format!(
                    "rule in {}: {}: {why}",
                    nft_chain(r.chain),
                    nft_rule_body(r)
                ))
            })?;
        }
        Ok(())
    }

    /// Whether `other` installs the same tables, chains, rules and policy
    /// routes: at most the members of its interface set differ, so a
    /// namespace holding one becomes the other by a membership change.
    pub fn same_rules(&self, other: &Plan) -> bool {
        self.ipv6 == other.ipv6
            && self.rules == other.rules
            && self.policy_routes == other.policy_routes
            && self.interfaces.is_some() == other.interfaces.is_some()
    }

    /// `rule` as a backend without interface sets installs it for `member`:
    /// the set match replaced by a match of that interface.
    pub fn for_member(rule: &Rule, member: &str) -> Rule {
        let mut r = rule.clone();
        for m in &mut r.matches {
            if *m == Match::IifInSet {
                *m = Match::Iif(member.to_owned());
            }
        }
        r
    }

    /// The rules that apply to `family` with the interface set spelled out,
    /// one rule per member in member order (none for an empty set): what
    /// backends without interface sets install.
    pub fn rules_with_members(&self, family: Family) -> Vec<Spelled> {
        let mut out = Vec::new();
        for r in self.rules_for(family) {
            if r.uses_interface_set() {
                for m in self.interfaces.iter().flatten() {
                    out.push(Spelled {
                        rule: Self::for_member(r, m),
                        member: Some(m.clone()),
                    });
                }
            } else {
                out.push(Spelled {
                    rule: r.clone(),
                    member: None,
                });
            }
        }
        out
    }

    /// Derives the rules of a validated, normalised spec; `interfaces`:
    /// the interface set, if capture is restricted to one.
    fn build(spec: &RedirectSpec, interfaces: Option<BTreeSet<String>>) -> Plan {
        let mut g = Gen {
            spec,
            interfaces: interfaces.as_ref(),
            rules: Vec::new(),
            families: if spec.ipv6 {
                vec![Family::V4, Family::V6]
            } else {
                vec![Family::V4]
            },
        };
        g.nat();
        if spec.mode == Mode::Tproxy {
            g.mangle_tproxy();
        }
        if spec.drop_invalid {
            g.drop_invalid();
        }
        if spec.capture_dns {
            g.raw_dns_zones();
        }
        let policy_routes = if spec.mode == Mode::Tproxy {
            g.families
                .iter()
                .map(|&family| PolicyRoute {
                    family,
                    mark: spec.tproxy_mark,
                    table: spec.tproxy_route_table,
                })
                .collect()
        } else {
            Vec::new()
        };
        Plan {
            ipv6: spec.ipv6,
            rules: g.rules,
            policy_routes,
            interfaces,
        }
    }

    /// Every chain the rules live in or jump to, base chains first, in a
    /// stable order.
    pub fn chains(&self) -> Vec<ChainId> {
        let mut set = std::collections::BTreeSet::new();
        for r in &self.rules {
            set.insert(r.chain);
            if let Action::Jump(own) = r.action {
                set.insert(ChainId {
                    table: r.chain.table,
                    chain: ChainRef::Own(own),
                });
            }
        }
        set.into_iter().collect()
    }

    /// The rules that apply to `family`, in order.
    pub fn rules_for(&self, family: Family) -> impl Iterator<Item = &Rule> {
        self.rules
            .iter()
            .filter(move |r| r.family.is_none_or(|f| f == family))
    }
}

/// Rule generator state.
struct Gen<'a> {
    spec: &'a RedirectSpec,
    /// The interface set inbound capture is restricted to, if any.
    interfaces: Option<&'a BTreeSet<String>>,
    rules: Vec<Rule>,
    families: Vec<Family>,
}

fn base(table: Table, hook: Hook) -> ChainId {
    ChainId {
        table,
        chain: ChainRef::Base(hook),
    }
}

fn own(table: Table, chain: OwnChain) -> ChainId {
    ChainId {
        table,
        chain: ChainRef::Own(chain),
    }
}

fn ports(v: &[Port]) -> Vec<u16> {
    v.iter().map(|p| p.0).collect()
}

impl Gen<'_> {
    fn push(
        &mut self,
        chain: ChainId,
        family: Option<Family>,
        matches: Vec<Match>,
        action: Action,
    ) {
        self.rules.push(Rule {
            chain,
            family,
            matches,
            action,
        });
    }

    /// Family of rules in base chains: without IPv6 capture, IPv6 packets
    /// must not even enter our chains (nft `inet` tables see both).
    fn base_family(&self) -> Option<Family> {
        if self.spec.ipv6 {
            None
        } else {
            Some(Family::V4)
        }
    }

    /// Interface exclusions go first in each base chain: RETURN there skips
    /// our jump (istio `-A PREROUTING -i NIC -j RETURN`).
    fn interface_returns(&mut self, table: Table) {
        let fam = self.base_family();
        for nic in self.spec.exclude_interfaces.clone() {
            self.push(
                base(table, Hook::Prerouting),
                fam,
                vec![Match::Iif(nic.clone())],
                Action::Return,
            );
            self.push(
                base(table, Hook::Output),
                fam,
                vec![Match::Oif(nic)],
                Action::Return,
            );
        }
    }

    /// Whether inbound capture reaches traffic arriving on `lo`, i.e. the
    /// proxy's hairpin to its own pod address (istio's rule (a) below).
    fn captures_lo(&self) -> bool {
        self.interfaces.is_none_or(|set| set.contains("lo"))
    }

    /// The PREROUTING jump into inbound capture, restricted to the members
    /// of the interface set if there is one.
    fn inbound_jumps(&mut self, table: Table) {
        let fam = self.base_family();
        let mut matches = vec![Match::Proto(L4::Tcp)];
        if self.interfaces.is_some() {
            matches.insert(0, Match::IifInSet);
        }
        self.push(
            base(table, Hook::Prerouting),
            fam,
            matches,
            Action::Jump(OwnChain::Inbound),
        );
    }

    fn nat(&mut self) {
        use Action::*;
        use Match::*;
        let s = self.spec;
        let t = Table::Nat;
        self.interface_returns(t);

        // Inbound (REDIRECT mode; TPROXY mode captures inbound in mangle).
        let inbound_redirect = s.mode == Mode::Redirect
            && !matches!(&s.include_inbound_ports, Selection::List(l) if l.is_empty());
        if inbound_redirect {
            self.inbound_jumps(t);
            match &s.include_inbound_ports {
                Selection::All => {
                    for p in ports(&s.exclude_inbound_ports) {
                        self.push(
                            own(t, OwnChain::Inbound),
                            None,
                            vec![Proto(L4::Tcp), Dport(p)],
                            Return,
                        );
                    }
                    self.push(
                        own(t, OwnChain::Inbound),
                        None,
                        vec![Proto(L4::Tcp)],
                        Jump(OwnChain::InRedirect),
                    );
                }
                Selection::List(l) => {
                    for p in ports(l) {
                        self.push(
                            own(t, OwnChain::Inbound),
                            None,
                            vec![Proto(L4::Tcp), Dport(p)],
                            Jump(OwnChain::InRedirect),
                        );
                    }
                }
            }
        }

        // Outbound. Without anything to capture and without the hairpin the
        // OUTPUT hook is left alone entirely (an endpoint whose proxy's own
        // upstream connections must go out directly).
        let redirects_out = !matches!(&s.include_outbound_cidrs, Selection::List(l) if l.is_empty())
            || !s.include_outbound_ports.is_empty();
        let owners: Vec<(Match, Match)> = s
            .proxy_uids
            .iter()
            .map(|&u| (Uid(u), NotUid(u)))
            .chain(s.proxy_gids.iter().map(|&g| (Gid(g), NotGid(g))))
            .collect();
        let hairpin = !owners.is_empty() && self.captures_lo();
        if redirects_out || s.capture_dns || hairpin {
            self.nat_output(&owners, hairpin);
        }
        if redirects_out {
            self.push(
                own(t, OwnChain::Redirect),
                None,
                vec![Proto(L4::Tcp)],
                Redirect(s.outbound_port.0),
            );
        }
        if inbound_redirect || hairpin {
            self.push(
                own(t, OwnChain::InRedirect),
                None,
                vec![Proto(L4::Tcp)],
                Redirect(s.inbound_port.0),
            );
        }
    }

    /// The nat OUTPUT chain, in istio's order. `owners`: (is, is-not)
    /// matches per proxy uid then gid; `hairpin`: emit rule (a).
    fn nat_output(&mut self, owners: &[(Match, Match)], hairpin: bool) {
        use Action::*;
        use Match::*;
        let s = self.spec;
        let fam = self.base_family();
        let t = Table::Nat;
        // Only TCP is ever redirected but DNS: other protocols skip the
        // chain, as istio's `-A OUTPUT -p tcp -j ISTIO_OUTPUT`.
        let entry = if s.capture_dns {
            vec![]
        } else {
            vec![Proto(L4::Tcp)]
        };
        self.push(base(t, Hook::Output), fam, entry, Jump(OwnChain::Output));
        let out = own(t, OwnChain::Output);
        // 1. Port excludes, TCP and UDP, before anything can loop back.
        for p in ports(&s.exclude_outbound_ports) {
            self.push(out, None, vec![Proto(L4::Tcp), Dport(p)], Return);
            self.push(out, None, vec![Proto(L4::Udp), Dport(p)], Return);
        }
        // 2. The proxy's inbound passthrough source (127.0.0.6 / ::6).
        for f in self.families.clone() {
            self.push(
                out,
                Some(f),
                vec![Oif("lo".into()), Saddr(f.passthrough_source())],
                Return,
            );
        }
        // 3. Socket-mark bypass (ambient style): protocol independent.
        if let Some(m) = s.bypass_mark {
            self.push(out, None, vec![Mark(m)], Return);
        }
        // 4. Owner exemptions, per uid then per gid (istio's three rules).
        // The hairpin skips DNS (when captured) and excluded inbound ports.
        let mut hairpin_skip: Vec<u16> = Vec::new();
        if s.capture_dns {
            hairpin_skip.push(53);
        }
        hairpin_skip.extend(ports(&s.exclude_inbound_ports));
        hairpin_skip.sort_unstable();
        hairpin_skip.dedup();
        for (is, is_not) in owners {
            // (a) proxy → own pod address over lo → inbound proxy (hairpin).
            if hairpin {
                for f in self.families.clone() {
                    let mut m = vec![Oif("lo".into()), NotDaddr(f.localhost()), Proto(L4::Tcp)];
                    if !hairpin_skip.is_empty() {
                        m.push(NotDports(hairpin_skip.clone()));
                    }
                    m.push(is.clone());
                    self.push(out, Some(f), m, Jump(OwnChain::InRedirect));
                }
            }
            // (b) anyone else over lo goes straight to the app.
            self.push(out, None, self.lo_return(is_not.clone()), Return);
            // (c) the proxy's own traffic never loops.
            self.push(out, None, vec![is.clone()], Return);
        }
        if owners.is_empty() {
            // Mark-only identity (ambient): loopback is never captured.
            let m = self.lo_matches();
            self.push(out, None, m, Return);
        }
        // 5. DNS.
        if s.capture_dns {
            self.push(out, None, vec![], Jump(OwnChain::OutputDns));
            let dns = own(t, OwnChain::OutputDns);
            for l4 in [L4::Tcp, L4::Udp] {
                self.push(
                    dns,
                    None,
                    vec![Proto(l4), Dport(53)],
                    Redirect(s.dns_port.0),
                );
            }
        }
        // 6. localhost.
        for f in self.families.clone() {
            self.push(out, Some(f), vec![Daddr(f.localhost())], Return);
        }
        // 7. CIDR excludes, then port includes, then CIDR includes.
        for net in s.exclude_outbound_cidrs.clone() {
            self.push(out, Some(Family::of(&net)), vec![Daddr(net)], Return);
        }
        for p in ports(&s.include_outbound_ports) {
            self.push(
                out,
                None,
                vec![Proto(L4::Tcp), Dport(p)],
                Jump(OwnChain::Redirect),
            );
        }
        match &s.include_outbound_cidrs {
            Selection::All => self.push(out, None, vec![], Jump(OwnChain::Redirect)),
            Selection::List(l) => {
                for net in l.clone() {
                    self.push(
                        out,
                        Some(Family::of(&net)),
                        vec![Daddr(net)],
                        Jump(OwnChain::Redirect),
                    );
                }
            }
        }
    }

    /// `-o lo` matches of istio's rule (b); with DNS capture, UDP and TCP 53
    /// over lo (to a local resolver) must still reach the DNS chain.
    fn lo_matches(&self) -> Vec<Match> {
        let mut m = vec![Match::Oif("lo".into())];
        if self.spec.capture_dns {
            m.push(Match::Proto(L4::Tcp));
            m.push(Match::NotDports(vec![53]));
        }
        m
    }

    fn lo_return(&self, owner: Match) -> Vec<Match> {
        let mut m = self.lo_matches();
        m.push(owner);
        m
    }

    /// TPROXY inbound capture in mangle (istio `tproxy.golden`).
    fn mangle_tproxy(&mut self) {
        use Action::*;
        use Match::*;
        let s = self.spec;
        let fam = self.base_family();
        let t = Table::Mangle;
        let mark = s.tproxy_mark;
        let full = |value| MarkMask {
            value,
            mask: u32::MAX,
        };
        self.interface_returns(t);
        let capture = !matches!(&s.include_inbound_ports, Selection::List(l) if l.is_empty());
        if capture {
            self.inbound_jumps(t);
        }
        self.push(
            base(t, Hook::Prerouting),
            fam,
            vec![Proto(L4::Tcp), Mark(full(mark))],
            SaveMark,
        );
        let out = base(t, Hook::Output);
        self.push(
            out,
            fam,
            vec![Proto(L4::Tcp), Oif("lo".into()), Mark(full(mark))],
            Return,
        );
        let owners: Vec<Match> = s
            .proxy_uids
            .iter()
            .map(|&u| Uid(u))
            .chain(s.proxy_gids.iter().map(|&g| Gid(g)))
            .collect();
        // The hairpin mark only matters when inbound capture sees `lo`.
        let owners = if self.captures_lo() {
            owners
        } else {
            Vec::new()
        };
        for owner in owners {
            for f in self.families.clone() {
                self.push(
                    out,
                    Some(f),
                    vec![
                        NotDaddr(f.localhost()),
                        Proto(L4::Tcp),
                        Oif("lo".into()),
                        owner.clone(),
                    ],
                    SetMark(OUTBOUND_MARK),
                );
            }
        }
        self.push(out, fam, vec![Proto(L4::Tcp), ConnMark(mark)], RestoreMark);

        if !capture {
            return;
        }
        let inb = own(t, OwnChain::Inbound);
        self.push(inb, None, vec![Proto(L4::Tcp), Mark(full(mark))], Return);
        for f in self.families.clone() {
            self.push(
                inb,
                Some(f),
                vec![
                    Proto(L4::Tcp),
                    Saddr(f.passthrough_source()),
                    Iif("lo".into()),
                ],
                Return,
            );
        }
        self.push(
            inb,
            None,
            vec![
                Proto(L4::Tcp),
                Iif("lo".into()),
                NotMark(full(OUTBOUND_MARK)),
            ],
            Return,
        );
        let divert_and_tproxy = |g: &mut Self, port: Option<u16>| {
            let mut m = vec![Proto(L4::Tcp)];
            if let Some(p) = port {
                m.push(Dport(p));
            }
            let mut est = m.clone();
            est.push(Ct(CtState::EstablishedRelated));
            g.push(inb, None, est, Jump(OwnChain::Divert));
            g.push(inb, None, m, Jump(OwnChain::Tproxy));
        };
        match &s.include_inbound_ports {
            Selection::All => {
                for p in ports(&s.exclude_inbound_ports) {
                    self.push(inb, None, vec![Proto(L4::Tcp), Dport(p)], Return);
                }
                divert_and_tproxy(self, None);
            }
            Selection::List(l) => {
                for p in ports(l) {
                    divert_and_tproxy(self, Some(p));
                }
            }
        }
        let divert = own(t, OwnChain::Divert);
        self.push(divert, None, vec![], SetMark(mark));
        self.push(divert, None, vec![], Accept);
        for f in self.families.clone() {
            self.push(
                own(t, OwnChain::Tproxy),
                Some(f),
                vec![NotDaddr(f.localhost()), Proto(L4::Tcp)],
                Tproxy {
                    port: s.inbound_port.0,
                    mark,
                },
            );
        }
    }

    fn drop_invalid(&mut self) {
        let fam = self.base_family();
        self.push(
            base(Table::Mangle, Hook::Prerouting),
            fam,
            vec![Match::Ct(CtState::Invalid)],
            Action::Jump(OwnChain::Drop),
        );
        self.push(
            own(Table::Mangle, OwnChain::Drop),
            None,
            vec![],
            Action::Drop,
        );
    }

    /// Conntrack zones for DNS (istio#33469): zone 1 = proxy ↔ upstream
    /// resolver, zone 2 = app ↔ proxy, so a UDP 4-tuple reused by both
    /// sides cannot skip the NAT.
    fn raw_dns_zones(&mut self) {
        use Action::*;
        use Match::*;
        let s = self.spec;
        let fam = self.base_family();
        let t = Table::Raw;
        let dns = own(t, OwnChain::OutputDns);
        self.push(
            base(t, Hook::Output),
            fam,
            vec![],
            Jump(OwnChain::OutputDns),
        );
        let mut owners: Vec<Match> = s
            .proxy_uids
            .iter()
            .map(|&u| Uid(u))
            .chain(s.proxy_gids.iter().map(|&g| Gid(g)))
            .collect();
        if let Some(m) = s.bypass_mark {
            owners.push(Mark(m));
        }
        for owner in owners {
            self.push(
                dns,
                None,
                vec![Proto(L4::Udp), Dport(53), owner.clone()],
                CtZone(1),
            );
            self.push(
                dns,
                None,
                vec![Proto(L4::Udp), Sport(s.dns_port.0), owner],
                CtZone(2),
            );
        }
        self.push(dns, None, vec![Proto(L4::Udp), Dport(53)], CtZone(2));
        self.push(
            base(t, Hook::Prerouting),
            fam,
            vec![],
            Jump(OwnChain::Inbound),
        );
        self.push(
            own(t, OwnChain::Inbound),
            None,
            vec![Proto(L4::Udp), Sport(53)],
            CtZone(1),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(plan: &Plan, table: Table) -> usize {
        plan.rules.iter().filter(|r| r.chain.table == table).count()
    }

    #[test]
    fn defaults_match_istio_cni_basic_shape() {
        let plan = Plan::new(&RedirectSpec::default()).unwrap();
        // nat only, no policy routing.
        assert_eq!(count(&plan, Table::Mangle) + count(&plan, Table::Raw), 0);
        assert!(plan.policy_routes.is_empty());
        let out: Vec<_> = plan
            .rules
            .iter()
            .filter(|r| r.chain == own(Table::Nat, OwnChain::Output))
            .collect();
        // istio basic.txt.golden has 11 ISTIO_OUTPUT rules; we add no more.
        assert_eq!(out.len(), 11, "{out:#?}");
        assert_eq!(out.last().unwrap().action, Action::Jump(OwnChain::Redirect));
        assert_eq!(
            out[0].matches,
            vec![Match::Proto(L4::Tcp), Match::Dport(15020)]
        );
    }

    #[test]
    fn v4_only_spec_keeps_ipv6_out_of_our_chains() {
        let plan = Plan::new(&RedirectSpec::default()).unwrap();
        for r in &plan.rules {
            if matches!(r.chain.chain, ChainRef::Base(_)) {
                assert_eq!(r.family, Some(Family::V4), "{r:?}");
            }
            assert_ne!(r.family, Some(Family::V6));
        }
    }

    #[test]
    fn tproxy_adds_mangle_and_policy_routes_per_family() {
        let spec = RedirectSpec {
            mode: Mode::Tproxy,
            ipv6: true,
            ..Default::default()
        };
        let plan = Plan::new(&spec).unwrap();
        assert_eq!(plan.policy_routes.len(), 2);
        assert!(plan.rules.iter().any(|r| matches!(
            r.action,
            Action::Tproxy {
                port: 15006,
                mark: 1337
            }
        ) && r.family == Some(Family::V6)));
        assert!(
            !plan.rules.iter().any(|r| r.chain.table == Table::Nat
                && r.chain.chain == ChainRef::Base(Hook::Prerouting))
        );
    }

    #[test]
    fn dns_capture_adds_zones_and_redirect() {
        let spec = RedirectSpec {
            capture_dns: true,
            ..Default::default()
        };
        let plan = Plan::new(&spec).unwrap();
        assert!(
            plan.rules
                .iter()
                .any(|r| r.action == Action::Redirect(15053)
                    && r.matches == vec![Match::Proto(L4::Udp), Match::Dport(53)])
        );
        assert_eq!(
            plan.rules
                .iter()
                .filter(|r| matches!(r.action, Action::CtZone(_)))
                .count(),
            // uid + gid, two rules each, plus the catch-all and the inbound one
            6
        );
    }

    fn prerouting_jumps(plan: &Plan, table: Table) -> Vec<Vec<Match>> {
        plan.rules
            .iter()
            .filter(|r| {
                r.chain == base(table, Hook::Prerouting)
                    && r.action == Action::Jump(OwnChain::Inbound)
            })
            .map(|r| r.matches.clone())
            .collect()
    }

    /// What an endpoint in front of its clients' links asks for: inbound
    /// capture on listed interfaces only, nothing outbound.
    fn endpoint_spec(mode: Mode) -> RedirectSpec {
        RedirectSpec {
            mode,
            inbound_port: Port(15001),
            outbound_port: Port(15002),
            include_outbound_cidrs: Selection::List(vec![]),
            exclude_outbound_ports: vec![],
            exclude_inbound_ports: vec![],
            include_interfaces: vec!["nsm-b".into(), "nsm-a".into()],
            ..Default::default()
        }
    }

    #[test]
    fn include_interfaces_capture_inbound_only_there() {
        let plan = Plan::new(&endpoint_spec(Mode::Redirect)).unwrap();
        let in_set = vec![Match::IifInSet, Match::Proto(L4::Tcp)];
        // One jump testing set membership, whatever the number of members.
        assert_eq!(
            prerouting_jumps(&plan, Table::Nat),
            std::slice::from_ref(&in_set)
        );
        let members: Vec<&str> = plan
            .interfaces
            .iter()
            .flatten()
            .map(|s| s.as_str())
            .collect();
        assert_eq!(members, ["nsm-a", "nsm-b"]);
        // Spelled out (iptables): one jump per member, in member order.
        let iif = |n: &str| vec![Match::Iif(n.into()), Match::Proto(L4::Tcp)];
        let spelled: Vec<Vec<Match>> = plan
            .rules_with_members(Family::V4)
            .into_iter()
            .filter(|s| s.rule.chain == base(Table::Nat, Hook::Prerouting))
            .map(|s| s.rule.matches)
            .collect();
        assert_eq!(spelled, [iif("nsm-a"), iif("nsm-b")]);
        // Everything that arrives there goes to the inbound port.
        assert!(plan.rules.iter().any(|r| {
            r.chain == own(Table::Nat, OwnChain::InRedirect) && r.action == Action::Redirect(15001)
        }));
        // No outbound capture and no hairpin over lo: the OUTPUT hook is
        // not touched at all, and nothing leads to the outbound port.
        assert!(
            !plan
                .rules
                .iter()
                .any(|r| r.chain.chain == ChainRef::Base(Hook::Output)
                    || r.chain.chain == ChainRef::Own(OwnChain::Output)
                    || r.action == Action::Redirect(15002)),
            "{:#?}",
            plan.rules
        );

        let tproxy = Plan::new(&endpoint_spec(Mode::Tproxy)).unwrap();
        assert_eq!(prerouting_jumps(&tproxy, Table::Mangle), [in_set]);
        assert!(prerouting_jumps(&tproxy, Table::Nat).is_empty());
        // The hairpin mark is useless when lo is not captured.
        assert!(
            !tproxy
                .rules
                .iter()
                .any(|r| r.action == Action::SetMark(OUTBOUND_MARK))
        );
        assert!(tproxy.rules.iter().all(|r| r.chain.table != Table::Nat));
    }

    #[test]
    fn an_interface_set_may_be_empty_and_members_change_no_rule() {
        let spec = endpoint_spec(Mode::Redirect);
        let empty = Plan::for_interfaces(&spec, Vec::new()).unwrap();
        assert_eq!(empty.interfaces, Some(BTreeSet::new()));
        // Still restricted: the jump tests the (empty) set, nothing is
        // captured until members come.
        assert_eq!(
            prerouting_jumps(&empty, Table::Nat),
            [vec![Match::IifInSet, Match::Proto(L4::Tcp)]]
        );
        assert!(
            empty
                .rules_with_members(Family::V4)
                .iter()
                .all(|s| s.rule.action != Action::Jump(OwnChain::Inbound))
        );
        let two = Plan::for_interfaces(&spec, vec!["nsm-b".into(), "nsm-a".into()]).unwrap();
        assert!(empty.same_rules(&two) && two.same_rules(&empty));
        assert_ne!(empty, two);
        // The spec's own list is replaced, not added to.
        assert_eq!(two, Plan::new(&spec).unwrap());
        // Not the same as capturing on every interface.
        let all = Plan::new(&RedirectSpec {
            include_interfaces: vec![],
            ..spec.clone()
        })
        .unwrap();
        assert!(!all.same_rules(&empty));
        // lo shapes the rules (the hairpin), so it is no mere member.
        let lo = Plan::for_interfaces(&spec, vec!["lo".into()]).unwrap();
        assert!(!lo.same_rules(&empty));
        assert!(matches!(
            Plan::for_interfaces(&spec, vec!["a/b".into()]),
            Err(SpecError::Interface {
                field: "includeInterfaces",
                ..
            })
        ));
    }

    #[test]
    fn listing_lo_keeps_the_hairpin() {
        let spec = RedirectSpec {
            include_interfaces: vec!["eth0".into(), "lo".into()],
            ..Default::default()
        };
        let plan = Plan::new(&spec).unwrap();
        let hairpins = plan
            .rules
            .iter()
            .filter(|r| {
                r.chain == own(Table::Nat, OwnChain::Output)
                    && r.action == Action::Jump(OwnChain::InRedirect)
            })
            .count();
        assert_eq!(hairpins, 2, "one per proxy uid and gid");
        let without_lo = Plan::new(&RedirectSpec {
            include_interfaces: vec!["eth0".into()],
            ..Default::default()
        })
        .unwrap();
        // Outbound capture stays; only the hairpin goes.
        assert!(!without_lo.rules.iter().any(|r| {
            r.chain == own(Table::Nat, OwnChain::Output)
                && r.action == Action::Jump(OwnChain::InRedirect)
        }));
        assert!(
            without_lo
                .rules
                .iter()
                .any(|r| r.action == Action::Redirect(15001))
        );
    }

    #[test]
    fn without_include_interfaces_the_plan_is_unchanged() {
        // The default spec keeps istio's single PREROUTING jump.
        let plan = Plan::new(&RedirectSpec::default()).unwrap();
        assert_eq!(
            prerouting_jumps(&plan, Table::Nat),
            [vec![Match::Proto(L4::Tcp)]]
        );
    }

    #[test]
    fn ports_after_icmp_and_empty_ranges_are_refused() {
        let rule = |matches| Rule {
            chain: own(Table::Mangle, OwnChain::Firewall),
            family: None,
            matches,
            action: Action::Drop,
        };
        let plan = |rules| Plan {
            ipv6: true,
            rules,
            policy_routes: vec![],
            interfaces: None,
        };
        let ok = [
            vec![Match::Proto(L4::Icmp), Match::LocalDaddr],
            vec![Match::Proto(L4::Udp), Match::SportRange(1, 2)],
            vec![Match::Proto(L4::Tcp), Match::DportRange(1000, 2000)],
        ];
        for m in ok {
            assert_eq!(rule(m.clone()).check(), Ok(()), "{m:?}");
        }
        assert!(plan(vec![]).check().is_ok());
        for m in [
            vec![Match::Proto(L4::Icmp), Match::Dport(80)],
            vec![Match::Sport(1), Match::Proto(L4::Icmpv6)],
            vec![Match::Proto(L4::Icmpv6), Match::SportRange(1, 2)],
            vec![Match::Proto(L4::Icmp), Match::NotDports(vec![1])],
            vec![Match::Proto(L4::Tcp), Match::SportRange(2000, 1000)],
            vec![Match::Proto(L4::Udp), Match::DportRange(53, 53)],
        ] {
            assert!(rule(m.clone()).check().is_err(), "{m:?}");
            let e = plan(vec![rule(m.clone())]).check().unwrap_err();
            assert!(
                matches!(&e, RulesError::Plan(why) if why.starts_with("rule in mangle_firewall: ")),
                "{e}"
            );
        }
        // Every rule istio's spec yields passes.
        let spec = RedirectSpec {
            mode: Mode::Tproxy,
            capture_dns: true,
            drop_invalid: true,
            ipv6: true,
            ..Default::default()
        };
        assert!(Plan::new(&spec).unwrap().check().is_ok());
    }

    #[test]
    fn invalid_spec_yields_no_plan() {
        let spec = RedirectSpec {
            proxy_uids: vec![],
            proxy_gids: vec![],
            ..Default::default()
        };
        assert_eq!(Plan::new(&spec), Err(SpecError::NoProxyIdentity));
    }
}
