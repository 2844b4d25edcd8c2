//! The firewall network function: ordered allow/deny rules over what the
//! endpoint's connections carry, in a table of its own in the endpoint's
//! netns (nftables by default, iptables too), whose interface set holds the
//! connections' interfaces ([`crate::own_table`]).
//!
//! Where it sits in the chain is where it sits in the packet path:
//! * **ingress** — before the mesh proxy (or with none): what clients send
//!   is filtered as it arrives on their interface, at prerouting with
//!   mangle priority, before the proxy's redirect (NAT priority) sees it;
//!   a denied packet is refused (ICMP admin-prohibited; iptables drops).
//! * **egress** — after the mesh proxy: what leaves the endpoint's netns
//!   (the proxy's upstream connections, forwarded traffic) is filtered at
//!   postrouting; a denied packet is dropped.
//!
//! The table exists while some connection uses the firewall. Rules see the
//! first packet of a flow; the rest of an allowed flow, and
//! its replies, pass (conntrack). ICMP to the endpoint's own addresses
//! (NSM's client pings its endpoint) and IPv6 neighbour discovery always
//! pass.

pub mod config;
pub mod nsm_acl;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use forwarder_plugin::rules::plan::{
    Action, ChainId, ChainRef, Family, Hook, L4, Match, OwnChain, Rule, Table,
};
use forwarder_plugin::rules::{Plan, PortRange, SpecError};
use nsm_api::connection::Connection;
use nsm_api::mechanism::MechanismExt;

use crate::chain::functions::{Claim, FunctionError, NetworkFunction};
use crate::mesh_proxy::capability;
use crate::own_table::state::StateFile;
use crate::own_table::{Live, OwnTable};
use config::{Atom, FirewallConfig, Protocol, Verdict};

/// The function type's name in configurations.
pub const TYPE: &str = "firewall";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// Before the proxy: what clients send.
    Ingress,
    /// After the proxy: what leaves the endpoint.
    Egress,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Position::Ingress => "ingress",
            Position::Egress => "egress",
        })
    }
}

pub struct Firewall {
    name: String,
    config: FirewallConfig,
    table: Arc<OwnTable>,
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("needs CAP_NET_ADMIN in the endpoint's netns to install its rules")]
    NoNetAdmin,
    #[error(transparent)]
    Netns(#[from] forwarder_plugin::netns::NetnsError),
    #[error(transparent)]
    State(#[from] crate::own_table::state::StateError),
    #[error("its rules: {0}")]
    Rules(String),
}

fn chain(table: Table, chain: ChainRef) -> ChainId {
    ChainId { table, chain }
}

fn own() -> ChainId {
    chain(Table::Mangle, ChainRef::Own(OwnChain::Firewall))
}

fn rule(family: Option<Family>, matches: Vec<Match>, action: Action) -> Rule {
    Rule {
        chain: own(),
        family,
        matches,
        action,
    }
}

fn ports(
    m: &mut Vec<Match>,
    r: Option<PortRange>,
    single: fn(u16) -> Match,
    range: fn(u16, u16) -> Match,
) {
    if let Some(r) = r {
        m.push(if r.lo == r.hi {
            single(r.lo)
        } else {
            range(r.lo, r.hi)
        });
    }
}

fn atom_matches(a: &Atom) -> Vec<Match> {
    let mut m = Vec::new();
    match a.protocol {
        Protocol::Any => {}
        Protocol::Tcp => m.push(Match::Proto(L4::Tcp)),
        Protocol::Udp => m.push(Match::Proto(L4::Udp)),
        Protocol::Icmp => m.push(Match::Proto(L4::Icmp)),
        Protocol::Icmpv6 => m.push(Match::Proto(L4::Icmpv6)),
    }
    m.extend(a.source.map(Match::Saddr));
    m.extend(a.destination.map(Match::Daddr));
    ports(&mut m, a.source_ports, Match::Sport, Match::SportRange);
    ports(&mut m, a.destination_ports, Match::Dport, Match::DportRange);
    m
}

/// The firewall's rules at `position` for the connections' `interfaces`.
pub fn plan(config: &FirewallConfig, position: Position, interfaces: Vec<String>) -> Plan {
    let deny = match position {
        Position::Ingress => Action::Reject,
        Position::Egress => Action::Drop,
    };
    let mut rules = match position {
        Position::Ingress => vec![Rule {
            chain: chain(Table::Mangle, ChainRef::Base(Hook::Prerouting)),
            family: None,
            matches: vec![Match::IifInSet],
            action: Action::Jump(OwnChain::Firewall),
        }],
        Position::Egress => vec![
            Rule {
                chain: chain(Table::Mangle, ChainRef::Base(Hook::Postrouting)),
                family: None,
                matches: vec![Match::Oif("lo".into())],
                action: Action::Return,
            },
            Rule {
                chain: chain(Table::Mangle, ChainRef::Base(Hook::Postrouting)),
                family: None,
                matches: Vec::new(),
                action: Action::Jump(OwnChain::Firewall),
            },
        ],
    };
    let v6 = Some(Family::V6);
    let net = |s: &str| s.parse().expect("literal");
    rules.push(rule(
        None,
        vec![Match::Ct(
            forwarder_plugin::rules::plan::CtState::EstablishedRelated,
        )],
        Action::Return,
    ));
    if position == Position::Ingress {
        rules.push(rule(
            Some(Family::V4),
            vec![Match::Proto(L4::Icmp), Match::LocalDaddr],
            Action::Return,
        ));
        rules.push(rule(
            v6,
            vec![Match::Proto(L4::Icmpv6), Match::LocalDaddr],
            Action::Return,
        ));
    }
    // Neighbour discovery (link-local and its multicast) is how IPv6 works at all.
    rules.push(rule(
        v6,
        vec![Match::Proto(L4::Icmpv6), Match::Daddr(net("ff02::/16"))],
        Action::Return,
    ));
    rules.push(rule(
        v6,
        vec![Match::Proto(L4::Icmpv6), Match::Daddr(net("fe80::/10"))],
        Action::Return,
    ));
    for r in &config.rules {
        let action = match r.action {
            Verdict::Allow => Action::Return,
            Verdict::Deny => deny.clone(),
        };
        for a in r.expand() {
            let family = a.ipv6.map(|v6| if v6 { Family::V6 } else { Family::V4 });
            rules.push(rule(family, atom_matches(&a), action.clone()));
        }
    }
    if config.default_action == Verdict::Deny {
        rules.push(rule(None, Vec::new(), deny));
    }
    Plan {
        // IPv6 is always filtered: a firewall that let it through would fail open.
        ipv6: true,
        rules,
        policy_routes: Vec::new(),
        interfaces: Some(interfaces.into_iter().collect()),
    }
}

/// What a firewall configured so owns: its table.
pub fn claims(config: &FirewallConfig) -> Vec<Claim> {
    vec![Claim::Table(config.table.owner.as_str().to_owned())]
}

impl Firewall {
    /// The instance `name` at `position`; adopts its table from the state
    /// file under `state_dir` as mesh-proxy does.
    pub fn start(
        name: &str,
        config: FirewallConfig,
        position: Position,
        state_dir: Option<&Path>,
    ) -> Result<Firewall, FirewallError> {
        if !capability::effective(capability::CAP_NET_ADMIN) {
            return Err(FirewallError::NoNetAdmin);
        }
        let c = config.clone();
        let planner = move |members: Vec<String>, _ipv6: bool| -> Result<Plan, SpecError> {
            Ok(plan(&c, position, members))
        };
        let mut table = OwnTable::new(
            config.table.backend.kind(),
            config.table.owner.clone(),
            Box::new(planner),
        )?;
        if let Some(dir) = state_dir {
            let t = table.table();
            table = table.with_state(StateFile::open(dir, &t)?);
        }
        match table.adopt() {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                function = name,
                connections = n,
                "adopted the connections a previous run left in the table"
            ),
            Err(e) => {
                tracing::warn!(function = name, error = %e, "cannot adopt or remove the firewall rules of a previous run")
            }
        }
        tracing::info!(
            function = name,
            %position,
            rules = config.rules.len(),
            default = ?config.default_action,
            table = %table.table(),
            "firewall function"
        );
        Ok(Firewall {
            name: name.to_owned(),
            config,
            table: Arc::new(table),
        })
    }

    fn failed(&self, reason: impl Into<String>) -> FunctionError {
        FunctionError::Failed {
            function: self.name.clone(),
            reason: reason.into(),
        }
    }

    async fn update(&self, id: &str, entry: Option<Live>) -> Result<(), FunctionError> {
        self.table.set(id, entry).await.map_err(|e| self.failed(e))
    }
}

#[async_trait]
impl NetworkFunction for Firewall {
    fn name(&self) -> &str {
        &self.name
    }

    fn claims(&self) -> Vec<Claim> {
        claims(&self.config)
    }

    async fn apply(&self, conn: &mut Connection) -> Result<(), FunctionError> {
        let interface = conn
            .mechanism
            .as_ref()
            .and_then(|m| m.interface_name())
            .ok_or_else(|| self.failed("the KERNEL mechanism has no interface name"))?
            .to_owned();
        let ip = conn.context.as_ref().and_then(|c| c.ip_context.as_ref());
        let entry = Live {
            interface,
            ipv6: true,
            src: ip.map(|i| i.src_ip_addrs.clone()).unwrap_or_default(),
            dst: ip.map(|i| i.dst_ip_addrs.clone()).unwrap_or_default(),
        };
        self.update(&conn.id, Some(entry)).await
    }

    /// The table goes with the last connection: its rules (at egress, on
    /// everything the endpoint sends) must not outlive what they serve.
    async fn undo(&self, conn: &Connection) -> Result<(), FunctionError> {
        self.update(&conn.id, None).await?;
        self.table.remove_if_idle().await;
        Ok(())
    }

    fn adopted(&self) -> Vec<(String, Vec<String>, Vec<String>)> {
        self.table.adopted()
    }

    async fn maintain(&self) -> Vec<String> {
        self.table.upkeep().await
    }

    fn release(&self) {
        if let Err(e) = self.table.release() {
            tracing::warn!(function = %self.name, error = %e, "cannot remove the firewall rules at exit");
        }
    }
}
