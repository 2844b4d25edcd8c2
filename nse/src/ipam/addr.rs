//! Addresses as integers, so pools and exclusions of both families share one
//! range arithmetic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// One address: its family and its value as an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    pub v6: bool,
    pub n: u128,
}

impl Addr {
    pub fn ip(self) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::from(self.n))
        } else {
            // Pools of a v4 prefix only hold values below 2^32.
            IpAddr::V4(Ipv4Addr::from(self.n as u32))
        }
    }

    /// The `/32` or `/128` text NSM puts in `src_ip_addrs`/`dst_ip_addrs`/routes.
    pub fn host_prefix(self) -> String {
        match self.ip() {
            IpAddr::V4(a) => format!("{a}/32"),
            IpAddr::V6(a) => format!("{a}/128"),
        }
    }
}

impl From<IpAddr> for Addr {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => Addr {
                v6: false,
                n: u32::from(a) as u128,
            },
            IpAddr::V6(a) => Addr {
                v6: true,
                n: u128::from(a),
            },
        }
    }
}

/// First and last address of a prefix, inclusive (every address is usable, as in NSM's ippool).
pub fn bounds(net: &IpNet) -> (Addr, Addr) {
    (Addr::from(net.network()), Addr::from(net.broadcast()))
}

/// The address of a CIDR such as `198.18.0.1/32` (host bits kept, like Go's `net.ParseCIDR` IP).
pub fn parse_cidr_addr(s: &str) -> Option<Addr> {
    let net: IpNet = s.trim().parse().ok()?;
    Some(Addr::from(net.addr()))
}
