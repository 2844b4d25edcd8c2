//! TPROXY's policy routing: `ip rule fwmark M lookup T` and `ip route local
//! default dev lo table T`, per family, through the `ip` tool. Everything we
//! add carries routing protocol [`RT_PROTO`], which is how verify and cleanup
//! tell ours from the namespace's own rules and routes.

use serde::Deserialize;

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

#[derive(Deserialize)]
struct JsonRule {
    priority: u32,
    #[serde(default)]
    fwmark: Option<String>,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize)]
struct JsonRoute {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    dst: String,
    #[serde(default)]
    dev: Option<String>,
    #[serde(default)]
    table: Option<String>,
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

fn parse_json<T: for<'de> Deserialize<'de>>(text: &str) -> Result<Vec<T>> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(text).map_err(|e| RulesError::Parse {
        program: "ip -j".into(),
        why: e.to_string(),
    })
}

/// Our (tagged) rules and routes of one family.
fn list(ns: &Netns, f: Family) -> Result<(Vec<IpRule>, Vec<IpRoute>)> {
    let ip = require_tool("ip")?;
    let rules: Vec<JsonRule> =
        parse_json(&Run::new(&ip, [fam_flag(f), "-j", "rule", "show"]).output(ns)?)?;
    let proto = RT_PROTO.to_string();
    let rules = rules
        .into_iter()
        .filter(|r| r.protocol.as_deref() == Some(proto.as_str()))
        .map(|r| IpRule {
            pref: r.priority,
            fwmark: r.fwmark,
            table: r.table.unwrap_or_default(),
        })
        .collect();
    let routes: Vec<JsonRoute> = parse_json(
        &Run::new(
            &ip,
            [
                fam_flag(f),
                "-j",
                "route",
                "show",
                "table",
                "all",
                "proto",
                &proto,
            ],
        )
        .output(ns)?,
    )?;
    let routes = routes
        .into_iter()
        .map(|r| IpRoute {
            kind: r.kind.unwrap_or_else(|| "unicast".into()),
            dst: r.dst,
            dev: r.dev,
            table: r.table.unwrap_or_else(|| "main".into()),
        })
        .collect();
    Ok((rules, routes))
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
