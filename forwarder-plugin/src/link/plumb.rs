//! A veth pair between two namespaces with its addresses, routes and
//! neighbours, applied all-or-nothing and removed idempotently.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::addr::validate_address;
use super::{AddrOptions, LinkError, Links, MacAddr, Result, RouteSpec, VethPair, VethSpec};
use crate::netns::{Netns, NetnsError, NetnsId};

/// Everything about one veth pair: end `a` and end `b`, each in its own
/// namespace. Serializable so that a caller can persist what it applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VethPlan {
    pub a: VethEnd,
    pub b: VethEnd,
    /// MTU of both ends; `None` keeps the kernel default (1500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Add IPv6 addresses without duplicate address detection, so they are
    /// usable at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ipv6_nodad: bool,
}

/// One end of a [`VethPlan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VethEnd {
    /// The namespace, as [`Netns::open`] takes it: a name under `/run/netns`,
    /// an absolute path (`/proc/<pid>/ns/net`) or an `inode://dev/ino` URL.
    pub netns: String,
    /// Interface name (at most 15 bytes; no '/', ':', whitespace).
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// Addresses in prefix form, e.g. `198.18.0.1/32`, `fd00::1/128`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpNet>,
    /// Routes out of this end, added in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub neighbours: Vec<NeighbourSpec>,
}

/// A permanent neighbour entry on one end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighbourSpec {
    pub ip: IpAddr,
    /// `None`: the MAC of the other end of the pair (the usual case: the
    /// peer's address across the veth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
}

/// What [`plumb_veth`] left in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plumbed {
    pub a: PlumbedEnd,
    pub b: PlumbedEnd,
    /// `false` when everything asked for was already in place.
    pub changed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlumbedEnd {
    pub netns: NetnsId,
    pub index: u32,
    pub mac: Option<MacAddr>,
}

impl VethPlan {
    fn veth(&self) -> VethSpec {
        VethSpec {
            name: self.a.name.clone(),
            peer_name: self.b.name.clone(),
            mtu: self.mtu,
            mac: self.a.mac,
            peer_mac: self.b.mac,
        }
    }

    /// Checks everything that can be checked without the kernel.
    pub fn validate(&self) -> Result<()> {
        self.veth().validate()?;
        for end in [&self.a, &self.b] {
            for addr in &end.addresses {
                validate_address(addr)?;
            }
            for route in &end.routes {
                route.validate()?;
            }
            for n in &end.neighbours {
                if n.ip.is_unspecified() || n.ip.is_multicast() {
                    return Err(LinkError::InvalidRequest(format!(
                        "neighbour {} is not a unicast address",
                        n.ip
                    )));
                }
                if let Some(mac) = n.mac
                    && !mac.is_assignable()
                {
                    return Err(LinkError::InvalidRequest(format!(
                        "neighbour {} at {mac}: not a unicast MAC",
                        n.ip
                    )));
                }
            }
        }
        Ok(())
    }
}

/// One change made by `plumb_veth`, to undo on failure.
enum Undo {
    Link {
        index: u32,
    },
    Address {
        b_side: bool,
        index: u32,
        addr: IpNet,
    },
    Up {
        b_side: bool,
        index: u32,
    },
    Route {
        b_side: bool,
        index: u32,
        route: RouteSpec,
    },
    Neighbour {
        b_side: bool,
        index: u32,
        ip: IpAddr,
    },
}

/// Creates the pair, sets MTU and MACs, adds the addresses, brings both ends
/// up, then adds routes and neighbours. Whatever already exists identically
/// is kept; on any failure everything this call changed is undone, so nothing
/// is left half-plumbed. Needs a tokio runtime.
pub async fn plumb_veth(plan: &VethPlan) -> Result<Plumbed> {
    plan.validate()?;
    plumb_veth_in(
        plan,
        &Netns::open(&plan.a.netns)?,
        &Netns::open(&plan.b.netns)?,
    )
    .await
}

/// [`plumb_veth`] into namespaces the caller already holds (e.g. descriptors
/// received over grpcfd, which may have no path to open them by): `a` and
/// `b` are used instead of opening `plan.a.netns` and `plan.b.netns`.
pub async fn plumb_veth_in(plan: &VethPlan, a: &Netns, b: &Netns) -> Result<Plumbed> {
    plan.validate()?;
    plumb_veth_with(plan, &Links::open(a)?, &Links::open(b)?).await
}

/// [`plumb_veth`] through netlink handles the caller already has open in
/// end `a`'s and end `b`'s namespaces (e.g. one kept for a namespace that
/// many veths end in), saving a socket (and a thread) per namespace.
pub async fn plumb_veth_with(plan: &VethPlan, a: &Links, b: &Links) -> Result<Plumbed> {
    plan.validate()?;
    let mut undo = Vec::new();
    match apply(a, b, plan, &mut undo).await {
        Ok(pair) => Ok(Plumbed {
            a: PlumbedEnd {
                netns: a.netns_id(),
                index: pair.local.index,
                mac: pair.local.mac,
            },
            b: PlumbedEnd {
                netns: b.netns_id(),
                index: pair.peer.index,
                mac: pair.peer.mac,
            },
            changed: !undo.is_empty(),
        }),
        Err(e) => match roll_back(a, b, undo).await {
            failures if failures.is_empty() => Err(e),
            failures => Err(LinkError::RollbackFailed {
                cause: Box::new(e),
                failures: failures.join("; "),
            }),
        },
    }
}

async fn apply(a: &Links, b: &Links, plan: &VethPlan, undo: &mut Vec<Undo>) -> Result<VethPair> {
    let pair = a.add_veth(&plan.veth(), b).await?;
    if pair.created {
        undo.push(Undo::Link {
            index: pair.local.index,
        });
    }
    let opts = AddrOptions {
        nodad: plan.ipv6_nodad,
    };
    let ends = [
        (false, a, &plan.a, &pair.local, pair.peer.mac),
        (true, b, &plan.b, &pair.peer, pair.local.mac),
    ];
    for &(b_side, links, end, link, _) in &ends {
        for addr in &end.addresses {
            if links.add_address(link.index, *addr, opts).await? {
                undo.push(Undo::Address {
                    b_side,
                    index: link.index,
                    addr: *addr,
                });
            }
        }
    }
    for &(b_side, links, _, link, _) in &ends {
        if !link.up {
            links.set_up(link.index).await?;
            undo.push(Undo::Up {
                b_side,
                index: link.index,
            });
        }
    }
    for &(b_side, links, end, link, other_mac) in &ends {
        for route in &end.routes {
            if links.add_route(link.index, route).await? {
                undo.push(Undo::Route {
                    b_side,
                    index: link.index,
                    route: route.clone(),
                });
            }
        }
        for n in &end.neighbours {
            let mac = n.mac.or(other_mac).ok_or_else(|| {
                LinkError::InvalidRequest(format!(
                    "neighbour {}: the other end has no MAC to use",
                    n.ip
                ))
            })?;
            if links.add_neighbour(link.index, n.ip, mac).await? {
                undo.push(Undo::Neighbour {
                    b_side,
                    index: link.index,
                    ip: n.ip,
                });
            }
        }
    }
    Ok(pair)
}

/// Newest change first; every step runs, and what failed is returned. A
/// link this call created takes its addresses, routes and neighbours with
/// it (and deleting one end of a veth deletes both), so then deleting it is
/// all there is to do.
async fn roll_back(a: &Links, b: &Links, undo: Vec<Undo>) -> Vec<String> {
    if let Some(Undo::Link { index }) = undo.first() {
        return match a.delete_index(*index, "rollback").await {
            Ok(_) => Vec::new(),
            Err(e) => vec![e.to_string()],
        };
    }
    let side = |b_side: bool| if b_side { b } else { a };
    let mut failures = Vec::new();
    for u in undo.into_iter().rev() {
        let res = match u {
            Undo::Link { index } => a.delete_index(index, "rollback").await,
            Undo::Address {
                b_side,
                index,
                addr,
            } => side(b_side).del_address(index, addr).await,
            Undo::Up { b_side, index } => side(b_side).set_down(index).await.map(|()| true),
            Undo::Route {
                b_side,
                index,
                route,
            } => side(b_side).del_route(index, &route).await,
            Undo::Neighbour { b_side, index, ip } => side(b_side).del_neighbour(index, ip).await,
        };
        if let Err(e) = res {
            failures.push(e.to_string());
        }
    }
    failures
}

/// Removes the pair described by `plan` (its addresses, routes and neighbours
/// go with it). Missing links or namespaces are fine: unplumbing twice is
/// `Ok`. A link named like end `a` that is not this plan's veth is left alone
/// and reported as a [`LinkError::LinkConflict`]. Needs a tokio runtime.
pub async fn unplumb(plan: &VethPlan) -> Result<()> {
    plan.validate()?;
    let Some(a_ns) = open_if_exists(&plan.a.netns)? else {
        // The kernel destroys a veth pair together with either namespace.
        return Ok(());
    };
    let b_ns = open_if_exists(&plan.b.netns)?;
    unplumb_in(plan, &a_ns, b_ns.as_ref()).await
}

/// [`unplumb`] in namespaces the caller already holds; `b: None` means end
/// `b`'s namespace is gone (then only the kind of link `a` is checked).
pub async fn unplumb_in(plan: &VethPlan, a_ns: &Netns, b_ns: Option<&Netns>) -> Result<()> {
    plan.validate()?;
    let b = b_ns.map(Links::open).transpose()?;
    unplumb_with(plan, &Links::open(a_ns)?, b.as_ref()).await
}

/// [`unplumb`] through netlink handles open in the namespaces; `b: None`
/// means end `b`'s namespace is gone.
pub async fn unplumb_with(plan: &VethPlan, a: &Links, b: Option<&Links>) -> Result<()> {
    plan.validate()?;
    let Some(link) = a.link(&plan.a.name).await? else {
        return Ok(());
    };
    match b {
        Some(b) => {
            // Confirms the pair is ours (a veth whose peer is `b` in that
            // namespace); MTU and MACs may have been changed since.
            let ours = VethSpec {
                mtu: None,
                mac: None,
                peer_mac: None,
                ..plan.veth()
            };
            a.existing_veth(&ours, b).await?;
        }
        None if link.kind.as_deref() != Some("veth") => {
            return Err(LinkError::LinkConflict {
                name: plan.a.name.clone(),
                why: format!(
                    "it is a {} link, not a veth",
                    link.kind.as_deref().unwrap_or("physical")
                ),
            });
        }
        None => {}
    }
    a.delete_index(link.index, &plan.a.name).await?;
    Ok(())
}

fn open_if_exists(spec: &str) -> Result<Option<Netns>> {
    match Netns::open(spec) {
        Ok(ns) => Ok(Some(ns)),
        Err(NetnsError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> VethPlan {
        serde_json::from_str(
            r#"{
              "a": {"netns": "client", "name": "nsm-1",
                    "addresses": ["198.18.0.1/32", "fd00::1/128"],
                    "routes": [{"dst": "198.18.0.2/32"}, {"dst": "198.18.1.0/24", "via": "198.18.0.2", "onlink": true}],
                    "neighbours": [{"ip": "198.18.0.2"}]},
              "b": {"netns": "inode://4/4026532000", "name": "nsm-1-peer", "mac": "02:fe:00:00:00:02",
                    "addresses": ["198.18.0.2/32"], "routes": [{"dst": "198.18.0.1/32", "table": 100}]},
              "mtu": 1450,
              "ipv6_nodad": true
            }"#,
        )
        .unwrap()
    }

    #[test]
    fn plan_round_trips_through_json() {
        let p = plan();
        assert_eq!(p.b.mac, Some(MacAddr([2, 0xfe, 0, 0, 0, 2])));
        assert_eq!(p.a.routes[1].via, Some("198.18.0.2".parse().unwrap()));
        assert_eq!(p.b.routes[0].table, Some(100));
        let back: VethPlan = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        p.validate().unwrap();
    }

    #[test]
    fn validate_catches_each_kind_of_bad_input() {
        let mut p = plan();
        p.a.name = "this-name-is-too-long".into();
        assert!(matches!(p.validate(), Err(LinkError::InvalidName { .. })));
        let mut p = plan();
        p.b.addresses.push("0.0.0.0/32".parse().unwrap());
        assert!(matches!(p.validate(), Err(LinkError::InvalidRequest(_))));
        let mut p = plan();
        p.a.routes.push(RouteSpec::via_onlink(
            "fd00::/64".parse().unwrap(),
            "198.18.0.2".parse().unwrap(),
        ));
        assert!(matches!(p.validate(), Err(LinkError::InvalidRequest(_))));
        let mut p = plan();
        p.mtu = Some(70000);
        assert!(matches!(p.validate(), Err(LinkError::InvalidRequest(_))));
        let mut p = plan();
        p.a.neighbours.push(NeighbourSpec {
            ip: "ff02::1".parse().unwrap(),
            mac: None,
        });
        assert!(matches!(p.validate(), Err(LinkError::InvalidRequest(_))));
    }
}
