//! Unicast routes out of one link, with or without a gateway.

use std::net::IpAddr;

use ipnet::IpNet;
use nix::errno::Errno;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use serde::{Deserialize, Serialize};

use super::{LinkError, Links, Result, is_errno};

/// A route to `dst` out of a given link, optionally via a gateway.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RouteSpec {
    /// A network (`198.18.0.2/32`, `fd00::/64`, `0.0.0.0/0`): no host bits.
    pub dst: IpNet,
    /// Gateway (next hop), same family as `dst`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<IpAddr>,
    /// The gateway is on the link even though no connected route covers it:
    /// needed with NSM's /32 addresses, whose peers are on no shared subnet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub onlink: bool,
    /// Routing table; `None` is the main table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// Route metric (preference among routes to the same destination, lower
    /// wins); `None`: the kernel's default (0 for IPv4, 1024 for IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
}

impl RouteSpec {
    /// A route straight out of the link (no gateway), in the main table.
    pub fn direct(dst: IpNet) -> RouteSpec {
        RouteSpec {
            dst,
            via: None,
            onlink: false,
            table: None,
            metric: None,
        }
    }

    /// A route via `gateway` treated as on-link, in the main table.
    pub fn via_onlink(dst: IpNet, gateway: IpAddr) -> RouteSpec {
        RouteSpec {
            dst,
            via: Some(gateway),
            onlink: true,
            table: None,
            metric: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| {
            Err(LinkError::InvalidRequest(format!(
                "route to {}: {why}",
                self.dst
            )))
        };
        if self.dst != self.dst.trunc() {
            return bad(format!(
                "host bits are set (the network is {})",
                self.dst.trunc()
            ));
        }
        if let Some(gw) = self.via {
            if gw.is_ipv4() != self.dst.addr().is_ipv4() {
                return bad(format!("gateway {gw} is not of the destination's family"));
            }
            if gw.is_unspecified() || gw.is_multicast() {
                return bad(format!("{gw} cannot be a gateway"));
            }
        } else if self.onlink {
            return bad("onlink needs a gateway".to_owned());
        }
        if self.table == Some(0) {
            return bad("table 0 is not a routing table".to_owned());
        }
        Ok(())
    }

    fn table_id(&self) -> u32 {
        self.table.unwrap_or(u32::from(RouteHeader::RT_TABLE_MAIN))
    }

    fn message(&self, index: u32) -> RouteMessage {
        let mut m = RouteMessage::default();
        let table = self.table_id();
        m.header.address_family = family(&self.dst.addr());
        m.header.destination_prefix_length = self.dst.prefix_len();
        // Tables above 255 only fit in RTA_TABLE.
        m.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        m.header.protocol = RouteProtocol::Static;
        m.header.kind = RouteType::Unicast;
        m.header.scope = if self.via.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if self.onlink {
            m.header.flags |= RouteFlags::Onlink;
        }
        if self.dst.prefix_len() > 0 {
            m.attributes
                .push(RouteAttribute::Destination(self.dst.addr().into()));
        }
        if let Some(gw) = self.via {
            m.attributes.push(RouteAttribute::Gateway(gw.into()));
        }
        m.attributes.push(RouteAttribute::Oif(index));
        m.attributes.push(RouteAttribute::Table(table));
        if let Some(metric) = self.metric {
            m.attributes.push(RouteAttribute::Priority(metric));
        }
        m
    }
}

impl std::fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(gw) = self.via {
            write!(f, " via {gw}")?;
        }
        if self.onlink {
            write!(f, " onlink")?;
        }
        if let Some(t) = self.table {
            write!(f, " table {t}")?;
        }
        if let Some(m) = self.metric {
            write!(f, " metric {m}")?;
        }
        Ok(())
    }
}

fn family(ip: &IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some((*ip).into()),
        RouteAddress::Inet6(ip) => Some((*ip).into()),
        _ => None,
    }
}

/// A unicast route as dumped by the kernel: where it goes and out of which link.
struct Dumped {
    spec: RouteSpec,
    oif: Option<u32>,
}

impl Dumped {
    fn parse(m: &RouteMessage) -> Option<Dumped> {
        if m.header.kind != RouteType::Unicast {
            return None;
        }
        let zero: IpAddr = match m.header.address_family {
            AddressFamily::Inet => std::net::Ipv4Addr::UNSPECIFIED.into(),
            AddressFamily::Inet6 => std::net::Ipv6Addr::UNSPECIFIED.into(),
            _ => return None,
        };
        let mut dst = zero;
        let mut via = None;
        let mut oif = None;
        let mut table = u32::from(m.header.table);
        let mut metric = None;
        for a in &m.attributes {
            match a {
                RouteAttribute::Priority(p) => metric = Some(*p),
                RouteAttribute::Destination(d) => dst = ip_of(d)?,
                RouteAttribute::Gateway(g) => via = ip_of(g),
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Table(t) => table = *t,
                _ => {}
            }
        }
        let main = u32::from(RouteHeader::RT_TABLE_MAIN);
        Some(Dumped {
            spec: RouteSpec {
                dst: IpNet::new(dst, m.header.destination_prefix_length).ok()?,
                via,
                onlink: m.header.flags.contains(RouteFlags::Onlink),
                table: (table != main).then_some(table),
                metric,
            },
            oif,
        })
    }
}

impl Links {
    /// Adds `route` out of link `index`. `Ok(false)` if that very route is
    /// already there; another route to the same destination in the same
    /// table is a conflict.
    pub async fn add_route(&self, index: u32, route: &RouteSpec) -> Result<bool> {
        route.validate()?;
        let msg = route.message(index);
        match self
            .ack(
                RouteNetlinkMessage::NewRoute(msg),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, Errno::EEXIST) => {
                let same_dst: Vec<Dumped> = self
                    .dump_routes(route.dst.addr())
                    .await?
                    .into_iter()
                    .filter(|d| d.spec.dst == route.dst && d.spec.table_id() == route.table_id())
                    .collect();
                if same_dst.iter().any(|d| {
                    d.oif == Some(index)
                        && d.spec.via == route.via
                        && (route.metric.is_none() || d.spec.metric == route.metric)
                }) {
                    return Ok(false);
                }
                let existing: Vec<String> = same_dst
                    .iter()
                    .map(|d| format!("{} dev ifindex {}", d.spec, d.oif.unwrap_or(0)))
                    .collect();
                Err(LinkError::Conflict {
                    what: format!("route {route} dev ifindex {index}"),
                    why: format!("the table has {}", existing.join("; ")),
                })
            }
            Err(e) => Err(self.kernel_err(format!("add route {route} dev ifindex {index}"), e)),
        }
    }

    /// Removes `route` out of link `index`; `Ok(false)` if it was not there.
    pub async fn del_route(&self, index: u32, route: &RouteSpec) -> Result<bool> {
        route.validate()?;
        let msg = route.message(index);
        match self.ack(RouteNetlinkMessage::DelRoute(msg), 0).await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, Errno::ESRCH) || is_errno(&e, Errno::ENODEV) => Ok(false),
            Err(e) => Err(self.kernel_err(format!("delete route {route} dev ifindex {index}"), e)),
        }
    }

    /// Unicast routes out of link `index` (both families, every table),
    /// including those the kernel adds for addresses.
    pub async fn routes(&self, index: u32) -> Result<Vec<RouteSpec>> {
        let mut out = Vec::new();
        for any in [
            IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
            IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
        ] {
            out.extend(
                self.dump_routes(any)
                    .await?
                    .into_iter()
                    .filter(|d| d.oif == Some(index))
                    .map(|d| d.spec),
            );
        }
        Ok(out)
    }

    async fn dump_routes(&self, family_of: IpAddr) -> Result<Vec<Dumped>> {
        let mut req = RouteMessage::default();
        req.header.address_family = family(&family_of);
        let replies = self
            .get(RouteNetlinkMessage::GetRoute(req), true)
            .await
            .map_err(|e| self.kernel_err("list routes", e))?;
        Ok(replies
            .iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewRoute(m) => Dumped::parse(m),
                _ => None,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert!(RouteSpec::direct(net("198.18.0.2/32")).validate().is_ok());
        assert!(
            RouteSpec::via_onlink(net("0.0.0.0/0"), "198.18.0.2".parse().unwrap())
                .validate()
                .is_ok()
        );
        assert!(RouteSpec::direct(net("198.18.0.2/24")).validate().is_err());
        assert!(
            RouteSpec::via_onlink(net("fd00::/64"), "198.18.0.2".parse().unwrap())
                .validate()
                .is_err()
        );
        let mut r = RouteSpec::direct(net("198.18.0.0/24"));
        r.onlink = true;
        assert!(r.validate().is_err());
        r.onlink = false;
        r.table = Some(0);
        assert!(r.validate().is_err());
    }

    #[test]
    fn serde_shape() {
        let r = RouteSpec::via_onlink(
            "198.18.1.0/24".parse().unwrap(),
            "198.18.0.1".parse().unwrap(),
        );
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(
            j,
            r#"{"dst":"198.18.1.0/24","via":"198.18.0.1","onlink":true}"#
        );
        let back: RouteSpec = serde_json::from_str(r#"{"dst":"fd00::2/128"}"#).unwrap();
        assert_eq!(back, RouteSpec::direct("fd00::2/128".parse().unwrap()));
    }
}
