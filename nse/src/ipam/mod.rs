//! Address management: NSM's point-to-point IPAM over `NSM_CIDR_PREFIX` groups.

mod addr;
mod cidr_group;
mod exclude;
mod p2p;
mod pool;

use std::fmt;
use std::str::FromStr;

pub use cidr_group::{CidrGroupError, parse_groups};
pub use p2p::{P2pIpam, Pending};

/// `NSM_IPAM_POLICY`: what to do with addresses a client presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Keep them (sdk default); recover them if they are ours and free.
    #[default]
    Polite,
    /// Drop those that are not free addresses of our prefixes (or already this connection's), as sdk `strictipam`.
    Strict,
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "polite" => Ok(Policy::Polite),
            "strict" => Ok(Policy::Strict),
            _ => Err(format!("{s:?} is not an IPAM policy: use polite or strict")),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::Polite => "polite",
            Policy::Strict => "strict",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error(
        "connection.context.ip_context.{field}: {value:?} is not a CIDR (expected e.g. 198.18.0.1/32)"
    )]
    Malformed { field: &'static str, value: String },
    #[error("IPAM exhausted: no free point-to-point address pair left in {prefixes}")]
    Exhausted { prefixes: String },
}
