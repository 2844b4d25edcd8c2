//! A connection's own routing in the client's namespace, from the
//! endpoint's answer:
//!
//! * **capture by intent** (`extra_context[`[`CLIENT_CAPTURE_KEY`]`]`, a
//!   [`CaptureSpec`]): the connection's mark on what the spec captures
//!   ([`Plan::capture`]), `ip rule fwmark <mark> lookup <table>`, and in that
//!   table the capture CIDRs via the endpoint's address. Plus, in the main
//!   table, a last-resort default route via the endpoint (the highest
//!   metric: a pod's own default route always wins) so that a namespace
//!   without any route still gets a source address for what is captured.
//! * **NSM policy routes** (`ip_context.policies`), installed as NSM's kernel
//!   forwarders do (sdk-kernel `iprule`): one table per policy holding its
//!   routes out of the connection's interface, and an `ip rule` with its
//!   selectors (`from`, `proto`, ports) looking that table up.
//!
//! Each connection that needs any of this gets a *slot* in its client
//! namespace (distinct from the slots of the namespace's other connections
//! at this hop), which numbers its mark and tables: slot `s` owns tables
//! `TABLE_BASE + 16·s` (capture, also the mark) to `+ 15` (policies).

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use nsm_api::connection::Connection;
use nsm_api::connectioncontext::PolicyRoute;
use serde::{Deserialize, Serialize};

use super::error::{HopError, Result};
use super::record::HopRecord;
use crate::link::{RULE_PRIORITY, RouteSpec, RuleSpec, VethPlan};
use crate::rules::plan::Family;
use crate::rules::{CaptureSpec, Plan, PortRange};

pub use nsm_api::contract::CLIENT_CAPTURE_KEY;

/// First table (and mark) number of slot 0: "mp" in ASCII, far from the
/// small numbers people pick by hand.
pub const TABLE_BASE: u32 = 0x6d70_0000;
/// Tables per slot: one for capture, the rest for policies.
pub const TABLES_PER_SLOT: u32 = 16;
/// Most connections with a slot in one client namespace.
pub const MAX_SLOTS: u16 = 4096;
/// Most policy routes one connection may carry (one table each).
pub const MAX_POLICIES: usize = (TABLES_PER_SLOT - 1) as usize;
/// Most routes over all of a connection's policies.
pub const MAX_POLICY_ROUTES: usize = 4096;

/// One of NSM's `PolicyRoute`s, parsed: packets matching the selectors are
/// routed by `routes` (a table of their own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sport: Option<(u16, u16)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dport: Option<(u16, u16)>,
    /// Routes out of the client's interface (no table: the slot decides).
    pub routes: Vec<RouteSpec>,
}

/// The capture spec the endpoint asked for, if any (absent or blank: none).
pub fn client_capture(conn: &Connection) -> Result<Option<CaptureSpec>> {
    let Some(text) = conn
        .context
        .as_ref()
        .and_then(|c| c.extra_context.get(CLIENT_CAPTURE_KEY))
        .filter(|t| !t.trim().is_empty())
    else {
        return Ok(None);
    };
    CaptureSpec::from_json(text)
        .map(Some)
        .map_err(|source| HopError::Capture {
            key: CLIENT_CAPTURE_KEY,
            source,
        })
}

fn port_range(s: &str) -> std::result::Result<Option<(u16, u16)>, String> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    let r: PortRange = s.parse()?;
    Ok(Some((r.lo, r.hi)))
}

/// `ip_context.policies` of the endpoint's answer, parsed and bounded.
pub fn policies(conn: &Connection) -> Result<Vec<Policy>> {
    let list: &[PolicyRoute] = conn
        .context
        .as_ref()
        .and_then(|c| c.ip_context.as_ref())
        .map(|ip| ip.policies.as_slice())
        .unwrap_or_default();
    if list.len() > MAX_POLICIES {
        return Err(HopError::Malformed {
            field: "policies",
            index: MAX_POLICIES,
            value: format!("{} policies", list.len()),
            why: format!("at most {MAX_POLICIES} policy routes per connection"),
        });
    }
    let total: usize = list.iter().map(|p| p.routes.len()).sum();
    if total > MAX_POLICY_ROUTES {
        return Err(HopError::Malformed {
            field: "policies",
            index: 0,
            value: format!("{total} routes"),
            why: format!("at most {MAX_POLICY_ROUTES} routes over all policies"),
        });
    }
    list.iter()
        .enumerate()
        .map(|(index, p)| {
            let bad = |why: String| HopError::Malformed {
                field: "policies",
                index,
                value: format!(
                    "from {:?} proto {:?} sport {:?} dport {:?}",
                    p.from, p.proto, p.src_port, p.dst_port
                ),
                why,
            };
            let from = if p.from.trim().is_empty() {
                None
            } else {
                Some(
                    p.from
                        .trim()
                        .parse::<IpNet>()
                        .map(|n| n.trunc())
                        .map_err(|_| bad("from is not a prefix, e.g. 198.18.0.1/32".into()))?,
                )
            };
            let proto = if p.proto.trim().is_empty() {
                None
            } else {
                Some(p.proto.trim().parse::<u8>().map_err(|_| {
                    bad(
                        "proto is an IP protocol number (6 for TCP, 17 for UDP), as NSM reads it"
                            .into(),
                    )
                })?)
            };
            let sport = port_range(&p.src_port).map_err(|w| bad(format!("src_port: {w}")))?;
            let dport = port_range(&p.dst_port).map_err(|w| bad(format!("dst_port: {w}")))?;
            if (sport.is_some() || dport.is_some()) && !matches!(proto, Some(6 | 17 | 132)) {
                return Err(bad(
                    "ports need proto 6 (TCP), 17 (UDP) or 132 (SCTP)".into()
                ));
            }
            let mut routes = super::veth_plan::routes("policies.routes", &p.routes)?;
            if routes.is_empty() {
                // NSM's forwarders route a policy without routes by default.
                routes.push(RouteSpec::direct("0.0.0.0/0".parse().expect("literal")));
            }
            if let Some(f) = from
                && let Some(r) = routes
                    .iter()
                    .find(|r| r.dst.addr().is_ipv6() != f.addr().is_ipv6())
            {
                return Err(bad(format!(
                    "route {} is not of the family of from {f}",
                    r.dst
                )));
            }
            Ok(Policy {
                from,
                proto,
                sport,
                dport,
                routes,
            })
        })
        .collect()
}

/// The capture table (and mark) of `slot`.
pub fn capture_table(slot: u16) -> u32 {
    TABLE_BASE + u32::from(slot) * TABLES_PER_SLOT
}

/// What a connection's slot puts in the client's namespace besides its
/// veth: routes (with the veth's client end), rules, and the capture plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientRouting {
    pub routes: Vec<RouteSpec>,
    pub rules: Vec<RuleSpec>,
    pub capture: Option<Plan>,
}

fn families(addrs: &[IpNet]) -> Vec<Family> {
    let set: BTreeSet<Family> = addrs.iter().map(Family::of).collect();
    set.into_iter().collect()
}

/// The first endpoint address of `family`: the client's gateway.
fn gateway(rec: &HopRecord, family: Family) -> Option<IpAddr> {
    rec.plan
        .b
        .addresses
        .iter()
        .find(|a| Family::of(a) == family)
        .map(IpNet::addr)
}

impl HopRecord {
    /// Whether the connection needs a slot in its client namespace.
    pub fn needs_slot(&self) -> bool {
        self.capture.is_some() || !self.policies.is_empty()
    }

    /// The client routing of this record (its slot must be set when it
    /// needs one).
    pub fn client_routing(&self) -> Result<ClientRouting> {
        let mut out = ClientRouting::default();
        if !self.needs_slot() {
            return Ok(out);
        }
        let slot = self
            .slot
            .ok_or_else(|| HopError::Task("a connection with client routing has no slot".into()))?;
        let base = capture_table(slot);
        if let Some(spec) = &self.capture {
            // Only families both ends have an address of.
            let fams: Vec<Family> = families(&self.plan.a.addresses)
                .into_iter()
                .filter(|f| gateway(self, *f).is_some())
                .collect();
            for &f in &fams {
                let gw = gateway(self, f).expect("filtered above");
                for net in spec.cidrs.iter().filter(|n| Family::of(n) == f) {
                    let mut r = RouteSpec::via_onlink(*net, gw);
                    r.table = Some(base);
                    out.routes.push(r);
                }
                let any = match f {
                    Family::V4 => "0.0.0.0/0",
                    Family::V6 => "::/0",
                };
                let mut last_resort = RouteSpec::via_onlink(any.parse().expect("literal"), gw);
                last_resort.metric = Some(u32::MAX - u32::from(slot));
                out.routes.push(last_resort);
                let mut rule = RuleSpec::to_table(f == Family::V6, base);
                rule.fwmark = Some(base);
                out.rules.push(rule);
            }
            let plan = Plan::capture(spec, &self.plan.a.name, base, &fams).map_err(|source| {
                HopError::Capture {
                    key: CLIENT_CAPTURE_KEY,
                    source,
                }
            })?;
            out.capture = Some(plan);
        }
        for (i, p) in self.policies.iter().enumerate() {
            let table = base + 1 + i as u32;
            let mut fams = BTreeSet::new();
            for r in &p.routes {
                let mut r = r.clone();
                r.table = Some(table);
                fams.insert(r.dst.addr().is_ipv6());
                out.routes.push(r);
            }
            for ipv6 in fams {
                out.rules.push(RuleSpec {
                    ipv6,
                    from: p.from,
                    fwmark: None,
                    ipproto: p.proto,
                    sport: p.sport,
                    dport: p.dport,
                    table,
                    priority: RULE_PRIORITY,
                });
            }
        }
        Ok(out)
    }

    /// The veth plan with the client routing's routes on the client end.
    pub fn veth_with_routing(&self, routing: &ClientRouting) -> VethPlan {
        let mut plan = self.plan.clone();
        plan.a.routes.extend(routing.routes.iter().cloned());
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hop::record::Session;
    use crate::hop::redirect::BackendName;
    use crate::link::VethEnd;
    use nsm_api::connectioncontext::{ConnectionContext, IpContext, Route};

    fn end(addrs: &[&str]) -> VethEnd {
        VethEnd {
            netns: "inode://4/1".into(),
            name: "nsm-1".into(),
            mac: None,
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            routes: vec![],
            neighbours: vec![],
        }
    }

    fn record(capture: Option<CaptureSpec>, policies: Vec<Policy>) -> HopRecord {
        HopRecord {
            proxy: None,
            proxy_alt: false,
            labels: Default::default(),
            plan: VethPlan {
                a: end(&["198.18.0.1/32", "fd00::1/128"]),
                b: end(&["198.18.0.0/32", "fd00::/128"]),
                mtu: None,
                ipv6_nodad: true,
            },
            rules: None,
            capture,
            policies,
            slot: Some(2),
            backend: BackendName::Nft,
            owner: "fp_0123456789abc".into(),
            client_netns: "inode://4/1".into(),
            endpoint_netns: "inode://4/2".into(),
            client_cookie: None,
            endpoint_cookie: None,
            session: Session::default(),
        }
    }

    #[test]
    fn capture_gets_a_marked_table_per_family_and_a_last_resort_route() {
        let spec = CaptureSpec {
            cidrs: vec!["0.0.0.0/0".parse().unwrap()],
            ..Default::default()
        };
        let r = record(Some(spec), vec![]).client_routing().unwrap();
        let t = capture_table(2);
        assert_eq!(t, 0x6d70_0020);
        let shown: Vec<String> = r.routes.iter().map(|x| x.to_string()).collect();
        assert_eq!(
            shown,
            [
                format!("0.0.0.0/0 via 198.18.0.0 onlink table {t}"),
                "0.0.0.0/0 via 198.18.0.0 onlink metric 4294967293".into(),
                "::/0 via fd00:: onlink metric 4294967293".into(),
            ]
        );
        let rules: Vec<String> = r.rules.iter().map(|x| x.to_string()).collect();
        assert_eq!(
            rules,
            [
                format!("-4 pref 32000 fwmark {t:#x} lookup {t}"),
                format!("-6 pref 32000 fwmark {t:#x} lookup {t}"),
            ]
        );
        assert!(r.capture.unwrap().ipv6);
    }

    fn conn_with(policies: Vec<PolicyRoute>) -> Connection {
        Connection {
            context: Some(ConnectionContext {
                ip_context: Some(IpContext {
                    policies,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn policies_parse_as_nsm_reads_them_and_get_a_table_each() {
        let p = policies(&conn_with(vec![
            PolicyRoute {
                proto: "6".into(),
                dst_port: "1-32767".into(),
                routes: vec![Route {
                    prefix: "198.19.0.0/16".into(),
                    next_hop: "198.18.0.0".into(),
                }],
                ..Default::default()
            },
            PolicyRoute {
                from: "198.18.0.1/32".into(),
                ..Default::default()
            },
        ]))
        .unwrap();
        assert_eq!(p[0].proto, Some(6));
        assert_eq!(p[0].dport, Some((1, 32767)));
        assert_eq!(p[1].routes[0].dst.to_string(), "0.0.0.0/0", "NSM's default");
        let r = record(None, p).client_routing().unwrap();
        let base = capture_table(2);
        let rules: Vec<String> = r.rules.iter().map(|x| x.to_string()).collect();
        assert_eq!(
            rules,
            [
                format!("-4 pref 32000 ipproto 6 dport 1-32767 lookup {}", base + 1),
                format!("-4 pref 32000 from 198.18.0.1/32 lookup {}", base + 2),
            ]
        );
        assert!(r.capture.is_none());
        assert_eq!(r.routes[0].table, Some(base + 1));
    }

    #[test]
    fn bad_policies_are_refused() {
        for (p, want) in [
            (
                PolicyRoute {
                    proto: "tcp".into(),
                    ..Default::default()
                },
                "IP protocol number",
            ),
            (
                PolicyRoute {
                    dst_port: "80".into(),
                    ..Default::default()
                },
                "ports need proto",
            ),
            (
                PolicyRoute {
                    proto: "6".into(),
                    dst_port: "90-80".into(),
                    ..Default::default()
                },
                "dst_port",
            ),
            (
                PolicyRoute {
                    from: "fd00::1/128".into(),
                    ..Default::default()
                },
                "not of the family",
            ),
            (
                PolicyRoute {
                    from: "banana".into(),
                    ..Default::default()
                },
                "from is not a prefix",
            ),
        ] {
            let e = policies(&conn_with(vec![p])).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let many = vec![PolicyRoute::default(); MAX_POLICIES + 1];
        assert!(policies(&conn_with(many)).is_err());
    }
}
