//! The NSE's answer as a veth pair: the client end gets `src_ip_addrs` and
//! `src_routes`, the endpoint end `dst_ip_addrs` and `dst_routes`, as NSM's
//! kernel forwarder programs them (sdk-kernel `ipcontext`).

use std::net::IpAddr;

use ipnet::IpNet;
use nsm_api::connection::Connection;
use nsm_api::connectioncontext::Route;

use super::error::{HopError, Result};
use crate::link::{RouteSpec, VethEnd, VethPlan};
use crate::netns::NetnsId;

/// MTU of both ends when the endpoint leaves `context.MTU` at 0.
pub const DEFAULT_MTU: u32 = 1500;

/// Where the two ends of a connection's veth go.
#[derive(Debug, Clone, Copy)]
pub struct Ends<'a> {
    pub client_netns: NetnsId,
    pub endpoint_netns: NetnsId,
    /// The client's mechanism `name`.
    pub client_if: &'a str,
    /// The endpoint's returned mechanism `name`.
    pub endpoint_if: &'a str,
}

/// Builds the veth plan for the endpoint's returned `conn`. Checks
/// everything [`VethPlan::validate`] checks, so a plan from here only fails
/// in the kernel.
pub fn veth_plan(ends: Ends<'_>, conn: &Connection) -> Result<VethPlan> {
    let ctx = conn.context.as_ref().ok_or(HopError::Missing {
        what: "connection.context",
        why: "addresses for both ends",
    })?;
    let ip = ctx.ip_context.as_ref().ok_or(HopError::Missing {
        what: "connection.context.ip_context",
        why: "addresses for both ends",
    })?;
    let src = addresses("src_ip_addrs", &ip.src_ip_addrs)?;
    let dst = addresses("dst_ip_addrs", &ip.dst_ip_addrs)?;
    let plan = VethPlan {
        a: VethEnd {
            netns: ends.client_netns.to_string(),
            name: ends.client_if.to_owned(),
            mac: None,
            addresses: src,
            routes: routes("src_routes", &ip.src_routes)?,
            neighbours: Vec::new(),
        },
        b: VethEnd {
            netns: ends.endpoint_netns.to_string(),
            name: ends.endpoint_if.to_owned(),
            mac: None,
            addresses: dst,
            routes: routes("dst_routes", &ip.dst_routes)?,
            neighbours: Vec::new(),
        },
        mtu: Some(if ctx.mtu == 0 { DEFAULT_MTU } else { ctx.mtu }),
        // NSM's addresses are meant to work as soon as the Request returns.
        ipv6_nodad: true,
    };
    plan.validate()?;
    Ok(plan)
}

fn addresses(field: &'static str, list: &[String]) -> Result<Vec<IpNet>> {
    if list.is_empty() {
        return Err(HopError::Missing {
            what: match field {
                "src_ip_addrs" => "connection.context.ip_context.src_ip_addrs",
                _ => "connection.context.ip_context.dst_ip_addrs",
            },
            why: "an address for each end (the client's src, the endpoint's dst)",
        });
    }
    list.iter()
        .enumerate()
        .map(|(index, s)| {
            s.parse::<IpNet>().map_err(|_| HopError::Malformed {
                field,
                index,
                value: s.clone(),
                why: "not an address in prefix form, e.g. 198.18.0.1/32".into(),
            })
        })
        .collect()
}

/// `nextHop` set: via that gateway, on-link (NSM's /32 peers share no
/// subnet); empty: straight out of the link. Host bits in the prefix are
/// dropped, as Go's `net.ParseCIDR` does for NSM's own forwarders.
pub(super) fn routes(field: &'static str, list: &[Route]) -> Result<Vec<RouteSpec>> {
    list.iter()
        .enumerate()
        .map(|(index, r)| {
            let bad = |why: String| HopError::Malformed {
                field,
                index,
                value: format!("{} via {:?}", r.prefix, r.next_hop),
                why,
            };
            let dst = r
                .prefix
                .parse::<IpNet>()
                .map_err(|_| bad("prefix is not a network, e.g. 198.18.0.0/24".into()))?
                .trunc();
            if r.next_hop.is_empty() {
                return Ok(RouteSpec::direct(dst));
            }
            let gw: IpAddr = r
                .next_hop
                .parse()
                .map_err(|_| bad("nextHop is not an IP address".into()))?;
            let spec = RouteSpec::via_onlink(dst, gw);
            spec.validate().map_err(|e| bad(e.to_string()))?;
            Ok(spec)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nsm_api::connectioncontext::{ConnectionContext, IpContext};

    fn ends() -> Ends<'static> {
        Ends {
            client_netns: NetnsId { dev: 4, ino: 100 },
            endpoint_netns: NetnsId { dev: 4, ino: 200 },
            client_if: "nsm-1",
            endpoint_if: "mesh-proxy-Ab3x",
        }
    }

    fn route(prefix: &str, next_hop: &str) -> Route {
        Route {
            prefix: prefix.into(),
            next_hop: next_hop.into(),
        }
    }

    fn conn(ip: IpContext, mtu: u32) -> Connection {
        Connection {
            context: Some(ConnectionContext {
                ip_context: Some(ip),
                mtu,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ip() -> IpContext {
        IpContext {
            src_ip_addrs: vec!["198.18.0.1/32".into()],
            dst_ip_addrs: vec!["198.18.0.2/32".into(), "fd00::2/128".into()],
            src_routes: vec![
                route("198.18.0.2/32", ""),
                route("198.18.5.7/24", "198.18.0.2"),
            ],
            dst_routes: vec![route("198.18.0.1/32", "")],
            ..Default::default()
        }
    }

    #[test]
    fn client_gets_src_endpoint_gets_dst() {
        let p = veth_plan(ends(), &conn(ip(), 0)).unwrap();
        assert_eq!(p.a.netns, "inode://4/100");
        assert_eq!(p.b.netns, "inode://4/200");
        assert_eq!(
            (p.a.name.as_str(), p.b.name.as_str()),
            ("nsm-1", "mesh-proxy-Ab3x")
        );
        assert_eq!(p.a.addresses, ["198.18.0.1/32".parse::<IpNet>().unwrap()]);
        assert_eq!(p.b.addresses.len(), 2);
        assert_eq!(
            p.a.routes,
            [
                RouteSpec::direct("198.18.0.2/32".parse().unwrap()),
                // host bits dropped, gateway on-link
                RouteSpec::via_onlink(
                    "198.18.5.0/24".parse().unwrap(),
                    "198.18.0.2".parse().unwrap()
                ),
            ]
        );
        assert_eq!(
            p.b.routes,
            [RouteSpec::direct("198.18.0.1/32".parse().unwrap())]
        );
        assert_eq!(p.mtu, Some(DEFAULT_MTU));
        assert!(p.ipv6_nodad);
        assert_eq!(
            veth_plan(ends(), &conn(ip(), 9000)).unwrap().mtu,
            Some(9000)
        );
    }

    #[test]
    fn missing_addresses_name_what_is_missing() {
        let mut i = ip();
        i.dst_ip_addrs.clear();
        let e = veth_plan(ends(), &conn(i, 0)).unwrap_err();
        assert!(e.to_string().contains("dst_ip_addrs"), "{e}");
        let e = veth_plan(ends(), &Connection::default()).unwrap_err();
        assert!(matches!(
            e,
            HopError::Missing {
                what: "connection.context",
                ..
            }
        ));
    }

    #[test]
    fn malformed_values_are_refused_with_their_place() {
        let mut i = ip();
        i.src_ip_addrs = vec!["198.18.0.1".into()];
        let e = veth_plan(ends(), &conn(i, 0)).unwrap_err();
        assert!(
            e.to_string().contains("src_ip_addrs[0] \"198.18.0.1\""),
            "{e}"
        );

        let mut i = ip();
        i.dst_routes.push(route("fd00::/64", "198.18.0.1"));
        let e = veth_plan(ends(), &conn(i, 0)).unwrap_err();
        assert!(e.to_string().contains("dst_routes[1]"), "{e}");

        let mut i = ip();
        i.src_routes.push(route("198.18.9.0/24", "nope"));
        assert!(matches!(
            veth_plan(ends(), &conn(i, 0)),
            Err(HopError::Malformed {
                field: "src_routes",
                index: 2,
                ..
            })
        ));

        // MTU and addresses are checked by the plan itself.
        assert!(matches!(
            veth_plan(ends(), &conn(ip(), 40)),
            Err(HopError::Link(_))
        ));
        let mut i = ip();
        i.src_ip_addrs = vec!["0.0.0.0/32".into()];
        assert!(matches!(
            veth_plan(ends(), &conn(i, 0)),
            Err(HopError::Link(_))
        ));
    }
}
