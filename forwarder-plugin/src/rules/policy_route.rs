//! TPROXY's policy routing: `ip rule fwmark M lookup T` and `ip route local
//! default dev lo table T`, per family, added and deleted with the `ip`
//! tool. Everything we add carries routing protocol [`RT_PROTO`], which is
//! how verify and cleanup tell ours from the namespace's own rules and
//! routes. Reading them — which every verify and cleanup does, REDIRECT
//! specs included — is a netlink dump in the namespace, not an `ip` process
//! per question: no process runs unless something has to change.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::rule::{RuleAttribute, RuleMessage};

use crate::netns::Netns;

use super::drift::DriftItem;
use super::error::{Result, RulesError};
use super::exec::{Run, find_tool, require_tool};
use super::plan::{Family, PolicyRoute};

/// Routing protocol number tagging our ip rules and routes (unassigned in
/// iproute2's rt_protos).
pub const RT_PROTO: u8 = 157;

#[derive(Debug, Clone, PartialEq, Eq)]
struct IpRule {
    pref: u32,
    fwmark: Option<String>,
    table: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct IpRoute {
    kind: String,
    dst: String,
    dev: Option<String>,
    table: String,
}

fn fam_flag(f: Family) -> &'static str {
    match f {
        Family::V4 => "-4",
        Family::V6 => "-6",
    }
}

fn fam_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// How `ip` names a routing table, so messages and `ip … del` arguments
/// read as they always did.
fn table_name(table: u32) -> String {
    match table {
        253 => "default".into(),
        254 => "main".into(),
        255 => "local".into(),
        t => t.to_string(),
    }
}

fn route_kind(kind: RouteType) -> String {
    match kind {
        RouteType::Unicast => "unicast".into(),
        RouteType::Local => "local".into(),
        RouteType::BlackHole => "blackhole".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

fn rule_of(m: &RuleMessage) -> Option<IpRule> {
    let mut ours = false;
    let (mut pref, mut fwmark, mut table) = (0, None, u32::from(m.header.table));
    for a in &m.attributes {
        match a {
            RuleAttribute::Protocol(p) => ours = u8::from(*p) == RT_PROTO,
            RuleAttribute::Priority(p) => pref = *p,
            RuleAttribute::FwMark(f) => fwmark = Some(format!("{f:#x}")),
            RuleAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    ours.then(|| IpRule {
        pref,
        fwmark,
        table: table_name(table),
    })
}

/// A tagged route; `names` resolves an interface index.
fn route_of(m: &RouteMessage, names: &dyn Fn(u32) -> String) -> Option<IpRoute> {
    if u8::from(m.header.protocol) != RT_PROTO {
        return None;
    }
    let (mut dst, mut dev, mut table) = (None, None, u32::from(m.header.table));
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(IpAddr::V4(*ip)),
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => dst = Some(IpAddr::V6(*ip)),
            RouteAttribute::Oif(i) => dev = Some(names(*i)),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    let len = m.header.destination_prefix_length;
    let dst = match dst {
        None if len == 0 => "default".to_owned(),
        None => format!("?/{len}"),
        Some(ip) if u32::from(len) == if ip.is_ipv4() { 32 } else { 128 } => ip.to_string(),
        Some(ip) => format!("{ip}/{len}"),
    };
    Some(IpRoute {
        kind: route_kind(m.header.kind),
        dst,
        dev,
        table: table_name(table),
    })
}

/// Our (tagged) rules and routes of one family, dumped over rtnetlink on a
/// thread inside the namespace.
fn list(ns: &Netns, f: Family) -> Result<(Vec<IpRule>, Vec<IpRoute>)> {
    let netns = ns.id();
    let family = match f {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    };
    let dumped = ns.run(|| -> std::io::Result<_> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        rt.block_on(async {
            let nl = |e: rtnetlink::Error| std::io::Error::other(e.to_string());
            let (conn, handle, _) = rtnetlink::new_connection()?;
            let driver = tokio::spawn(conn);
            let version = match f {
                Family::V4 => rtnetlink::IpVersion::V4,
                Family::V6 => rtnetlink::IpVersion::V6,
            };
            let rules: Vec<RuleMessage> = handle
                .rule()
                .get(version)
                .execute()
                .try_collect()
                .await
                .map_err(nl)?;
            let mut query = RouteMessage::default();
            query.header.address_family = family;
            let routes: Vec<RouteMessage> = handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(nl)?;
            // Names of the interfaces our routes use (only `lo`, normally).
            let mut names = std::collections::BTreeMap::new();
            for m in routes
                .iter()
                .filter(|m| u8::from(m.header.protocol) == RT_PROTO)
            {
                for a in &m.attributes {
                    if let RouteAttribute::Oif(i) = a
                        && !names.contains_key(i)
                    {
                        let link = handle
                            .link()
                            .get()
                            .match_index(*i)
                            .execute()
                            .try_next()
                            .await;
                        let name = link.ok().flatten().and_then(|l| {
                            l.attributes.into_iter().find_map(|a| match a {
                                netlink_packet_route::link::LinkAttribute::IfName(n) => Some(n),
                                _ => None,
                            })
                        });
                        names.insert(*i, name.unwrap_or_else(|| format!("if{i}")));
                    }
                }
            }
            driver.abort();
            Ok((rules, routes, names))
        })
    })?;
    let (rules, routes, names) = dumped.map_err(|source| RulesError::Netlink {
        op: format!("dump of {} policy routing", fam_name(f)),
        netns,
        source,
    })?;
    let name = |i: u32| names.get(&i).cloned().unwrap_or_else(|| format!("if{i}"));
    Ok((
        rules.iter().filter_map(rule_of).collect(),
        routes.iter().filter_map(|m| route_of(m, &name)).collect(),
    ))
}

fn rule_matches(r: &IpRule, want: &PolicyRoute) -> bool {
    let mark = r
        .fwmark
        .as_deref()
        .and_then(|m| u32::from_str_radix(m.trim_start_matches("0x"), 16).ok());
    mark == Some(want.mark) && r.table == want.table.to_string()
}

fn route_matches(r: &IpRoute, want: &PolicyRoute) -> bool {
    r.kind == "local"
        && r.dst == "default"
        && r.dev.as_deref() == Some("lo")
        && r.table == want.table.to_string()
}

fn describe_rule(f: Family, r: &IpRule) -> String {
    format!(
        "{} rule pref {} fwmark {} lookup {}",
        fam_name(f),
        r.pref,
        r.fwmark.as_deref().unwrap_or("-"),
        r.table
    )
}

fn describe_route(f: Family, r: &IpRoute) -> String {
    format!(
        "{} route {} {} dev {} table {}",
        fam_name(f),
        r.kind,
        r.dst,
        r.dev.as_deref().unwrap_or("-"),
        r.table
    )
}

fn families(want: &[PolicyRoute]) -> Vec<Family> {
    let mut f = vec![Family::V4];
    if want.iter().any(|w| w.family == Family::V6) || ipv6_enabled() {
        f.push(Family::V6);
    }
    f
}

fn ipv6_enabled() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Differences between our tagged rules/routes and `want`.
pub(crate) fn drift(ns: &Netns, want: &[PolicyRoute]) -> Result<Vec<DriftItem>> {
    let mut out = Vec::new();
    for f in families(want) {
        let (rules, routes) = list(ns, f)?;
        let wanted: Vec<&PolicyRoute> = want.iter().filter(|w| w.family == f).collect();
        for w in &wanted {
            if !rules.iter().any(|r| rule_matches(r, w)) {
                out.push(DriftItem::MissingPolicyRoute {
                    what: format!(
                        "{} rule fwmark {:#x} lookup {}",
                        fam_name(f),
                        w.mark,
                        w.table
                    ),
                });
            }
            if !routes.iter().any(|r| route_matches(r, w)) {
                out.push(DriftItem::MissingPolicyRoute {
                    what: format!(
                        "{} route local default dev lo table {}",
                        fam_name(f),
                        w.table
                    ),
                });
            }
        }
        for r in rules
            .iter()
            .filter(|r| !wanted.iter().any(|w| rule_matches(r, w)))
        {
            out.push(DriftItem::ExtraPolicyRoute {
                what: describe_rule(f, r),
            });
        }
        for r in routes
            .iter()
            .filter(|r| !wanted.iter().any(|w| route_matches(r, w)))
        {
            out.push(DriftItem::ExtraPolicyRoute {
                what: describe_route(f, r),
            });
        }
    }
    Ok(out)
}

/// Makes our tagged rules/routes exactly `want`. With an empty `want` this
/// does nothing (REDIRECT mode stays free of `ip` calls); [`prune`] and
/// [`cleanup`] remove leftovers of an earlier TPROXY spec.
pub(crate) fn ensure(ns: &Netns, want: &[PolicyRoute]) -> Result<()> {
    if want.is_empty() {
        return Ok(());
    }
    sync(ns, want)
}

/// Removes tagged rules/routes that `want` does not contain, adds missing ones.
pub(crate) fn prune(ns: &Netns, want: &[PolicyRoute]) -> Result<()> {
    sync(ns, want)
}

/// Removes every rule and route we tagged. Without `ip` there is nothing to
/// remove (we add them only with it), so a REDIRECT-only user such as an
/// endpoint image without iproute2 can still clean up.
pub(crate) fn cleanup(ns: &Netns) -> Result<()> {
    if find_tool("ip").is_none() {
        return Ok(());
    }
    sync(ns, &[])
}

fn sync(ns: &Netns, want: &[PolicyRoute]) -> Result<()> {
    let ip = require_tool("ip")?;
    let proto = RT_PROTO.to_string();
    for f in families(want) {
        let (rules, routes) = list(ns, f)?;
        let wanted: Vec<&PolicyRoute> = want.iter().filter(|w| w.family == f).collect();
        for r in rules
            .iter()
            .filter(|r| !wanted.iter().any(|w| rule_matches(r, w)))
        {
            let mut args = vec![fam_flag(f).to_owned(), "rule".into(), "del".into()];
            args.extend(["pref".into(), r.pref.to_string()]);
            if let Some(m) = &r.fwmark {
                args.extend(["fwmark".into(), m.clone()]);
            }
            args.extend([
                "lookup".into(),
                r.table.clone(),
                "proto".into(),
                proto.clone(),
            ]);
            Run::new(&ip, args).output(ns)?;
        }
        for r in routes
            .iter()
            .filter(|r| !wanted.iter().any(|w| route_matches(r, w)))
        {
            let mut args = vec![
                fam_flag(f).to_owned(),
                "route".into(),
                "del".into(),
                r.kind.clone(),
                r.dst.clone(),
            ];
            if let Some(d) = &r.dev {
                args.extend(["dev".into(), d.clone()]);
            }
            args.extend([
                "table".into(),
                r.table.clone(),
                "proto".into(),
                proto.clone(),
            ]);
            Run::new(&ip, args).output(ns)?;
        }
        for w in wanted {
            if !routes.iter().any(|r| route_matches(r, w)) {
                let table = w.table.to_string();
                Run::new(
                    &ip,
                    [
                        fam_flag(f),
                        "route",
                        "replace",
                        "local",
                        "default",
                        "dev",
                        "lo",
                        "table",
                        &table,
                        "proto",
                        &proto,
                    ],
                )
                .output(ns)?;
            }
            if !rules.iter().any(|r| rule_matches(r, w)) {
                let (mark, table) = (w.mark.to_string(), w.table.to_string());
                Run::new(
                    &ip,
                    [
                        fam_flag(f),
                        "rule",
                        "add",
                        "fwmark",
                        &mark,
                        "lookup",
                        &table,
                        "proto",
                        &proto,
                    ],
                )
                .output(ns)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::RouteProtocol;

    #[test]
    fn dumped_messages_read_as_ip_prints_them() {
        let mut rule = RuleMessage::default();
        rule.attributes = vec![
            RuleAttribute::Protocol(RouteProtocol::from(RT_PROTO)),
            RuleAttribute::Priority(32765),
            RuleAttribute::FwMark(1337),
            RuleAttribute::Table(133),
        ];
        assert_eq!(
            rule_of(&rule),
            Some(IpRule {
                pref: 32765,
                fwmark: Some("0x539".into()),
                table: "133".into()
            })
        );
        rule.attributes[0] = RuleAttribute::Protocol(RouteProtocol::Boot);
        assert_eq!(rule_of(&rule), None, "not ours");

        let mut route = RouteMessage::default();
        route.header.protocol = RouteProtocol::from(RT_PROTO);
        route.header.kind = RouteType::Local;
        route.header.table = 254;
        route.attributes = vec![RouteAttribute::Oif(1)];
        let lo = |i: u32| {
            if i == 1 {
                "lo".to_owned()
            } else {
                format!("if{i}")
            }
        };
        assert_eq!(
            route_of(&route, &lo),
            Some(IpRoute {
                kind: "local".into(),
                dst: "default".into(),
                dev: Some("lo".into()),
                table: "main".into()
            })
        );
        route.header.destination_prefix_length = 32;
        route.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet("198.18.0.1".parse().unwrap())),
            RouteAttribute::Table(133),
        ];
        let r = route_of(&route, &lo).unwrap();
        assert_eq!((r.dst.as_str(), r.table.as_str()), ("198.18.0.1", "133"));
        route.header.protocol = RouteProtocol::Kernel;
        assert_eq!(route_of(&route, &lo), None, "not ours");
    }
}
