//! Permanent neighbour (ARP/NDP) entries, so a peer whose MAC is known is
//! reached without a resolution round trip.

use std::net::IpAddr;

use nix::errno::Errno;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::{LinkError, Links, MacAddr, Result, is_errno};

fn message(index: u32, ip: IpAddr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
    m
}

impl Links {
    /// Makes `ip` on link `index` a permanent neighbour at `mac`. `Ok(false)`
    /// if exactly that permanent entry exists; an entry with another MAC or
    /// state (learnt, stale, an older plan's) is replaced.
    pub async fn add_neighbour(&self, index: u32, ip: IpAddr, mac: MacAddr) -> Result<bool> {
        if ip.is_unspecified() || ip.is_multicast() || !mac.is_assignable() {
            return Err(LinkError::InvalidRequest(format!(
                "neighbour {ip} at {mac}: needs a unicast IP and MAC"
            )));
        }
        let mut msg = message(index, ip);
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        let op = || format!("add neighbour {ip} lladdr {mac} on ifindex {index}");
        match self
            .ack(
                RouteNetlinkMessage::NewNeighbour(msg.clone()),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, Errno::EEXIST) => {
                if self.neighbour(index, ip).await? == Some((Some(mac), true)) {
                    return Ok(false);
                }
                self.ack(
                    RouteNetlinkMessage::NewNeighbour(msg),
                    NLM_F_CREATE | NLM_F_REPLACE,
                )
                .await
                .map_err(|e| self.kernel_err(op(), e))?;
                Ok(true)
            }
            Err(e) => Err(self.kernel_err(op(), e)),
        }
    }

    /// Removes the neighbour entry for `ip` on link `index`; `Ok(false)` if
    /// there was none.
    pub async fn del_neighbour(&self, index: u32, ip: IpAddr) -> Result<bool> {
        match self
            .ack(RouteNetlinkMessage::DelNeighbour(message(index, ip)), 0)
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, Errno::ENOENT) || is_errno(&e, Errno::ENODEV) => Ok(false),
            Err(e) => Err(self.kernel_err(format!("delete neighbour {ip} on ifindex {index}"), e)),
        }
    }

    /// The entry for `ip` on link `index`: its MAC and whether it is permanent.
    pub async fn neighbour(
        &self,
        index: u32,
        ip: IpAddr,
    ) -> Result<Option<(Option<MacAddr>, bool)>> {
        let mut req = NeighbourMessage::default();
        req.header.family = message(index, ip).header.family;
        let replies = self
            .get(RouteNetlinkMessage::GetNeighbour(req), true)
            .await
            .map_err(|e| self.kernel_err("list neighbours", e))?;
        let want = NeighbourAddress::from(ip);
        Ok(replies.iter().find_map(|r| match r {
            RouteNetlinkMessage::NewNeighbour(m)
                if m.header.ifindex == index
                    && m.attributes
                        .iter()
                        .any(|a| matches!(a, NeighbourAttribute::Destination(d) if *d == want)) =>
            {
                let mac = m.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(b) => MacAddr::from_bytes(b),
                    _ => None,
                });
                Some((mac, m.header.state == NeighbourState::Permanent))
            }
            _ => None,
        }))
    }
}
