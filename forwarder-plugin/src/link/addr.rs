//! Interface addresses, in prefix form (`198.18.0.1/32`, `fd00::1/128`).

use std::net::IpAddr;

use ipnet::IpNet;
use nix::errno::Errno;
use rtnetlink::AddressMessageBuilder;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};

use super::{LinkError, Links, Result, is_errno};

/// How to add an address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddrOptions {
    /// IPv6: skip duplicate address detection, so the address is usable at
    /// once instead of "tentative" for a second or more.
    pub nodad: bool,
}

pub(crate) fn validate_address(addr: &IpNet) -> Result<()> {
    let ip = addr.addr();
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(LinkError::InvalidRequest(format!(
            "{addr} cannot be an interface address"
        )));
    }
    if let IpAddr::V4(v4) = ip
        && v4.is_broadcast()
    {
        return Err(LinkError::InvalidRequest(format!(
            "{addr} cannot be an interface address"
        )));
    }
    Ok(())
}

fn message(index: u32, addr: &IpNet) -> AddressMessage {
    match addr.addr() {
        IpAddr::V4(ip) => AddressMessageBuilder::<std::net::Ipv4Addr>::new()
            .index(index)
            .address(ip, addr.prefix_len())
            .build(),
        IpAddr::V6(ip) => AddressMessageBuilder::<std::net::Ipv6Addr>::new()
            .index(index)
            .address(ip, addr.prefix_len())
            .build(),
    }
}

impl Links {
    /// Adds `addr` to link `index`. `Ok(false)` if exactly that address is
    /// already there; the same IP with another prefix is a conflict.
    pub async fn add_address(&self, index: u32, addr: IpNet, opts: AddrOptions) -> Result<bool> {
        validate_address(&addr)?;
        let mut msg = message(index, &addr);
        if opts.nodad && addr.addr().is_ipv6() {
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        let op = || format!("add address {addr} on ifindex {index}");
        match self
            .ack(
                RouteNetlinkMessage::NewAddress(msg),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, Errno::EEXIST) => {
                let present = self.addresses(index).await?;
                if present.contains(&addr) {
                    return Ok(false);
                }
                let same_ip: Vec<String> = present
                    .iter()
                    .filter(|p| p.addr() == addr.addr())
                    .map(|p| p.to_string())
                    .collect();
                Err(LinkError::Conflict {
                    what: format!("address {} on ifindex {index}", addr.addr()),
                    why: format!("it is configured as {}", same_ip.join(", ")),
                })
            }
            Err(e) => Err(self.kernel_err(op(), e)),
        }
    }

    /// Removes `addr` from link `index`; `Ok(false)` if it was not there.
    pub async fn del_address(&self, index: u32, addr: IpNet) -> Result<bool> {
        let msg = message(index, &addr);
        match self.ack(RouteNetlinkMessage::DelAddress(msg), 0).await {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, Errno::EADDRNOTAVAIL) || is_errno(&e, Errno::ENODEV) => {
                Ok(false)
            }
            Err(e) => Err(self.kernel_err(format!("delete address {addr} on ifindex {index}"), e)),
        }
    }

    /// The addresses on link `index`, both families (IPv6 link-local included).
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        let replies = self
            .get(
                RouteNetlinkMessage::GetAddress(AddressMessage::default()),
                true,
            )
            .await
            .map_err(|e| self.kernel_err(format!("list addresses of ifindex {index}"), e))?;
        Ok(replies
            .iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewAddress(m) if m.header.index == index => {
                    // IFA_LOCAL is the interface's own address (IFA_ADDRESS
                    // is the peer's on point-to-point links); IPv6 has only
                    // IFA_ADDRESS.
                    let local = m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Local(ip) => Some(*ip),
                        _ => None,
                    });
                    let address = m.attributes.iter().find_map(|a| match a {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    });
                    IpNet::new(local.or(address)?, m.header.prefix_len).ok()
                }
                _ => None,
            })
            .collect())
    }
}
