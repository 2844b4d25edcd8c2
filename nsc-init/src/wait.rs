//! Waiting until the hop has built what the answer promises: the interface,
//! admin-up, with every `src_ip_addrs` address, in our own netns. We only
//! look (getifaddrs, which reads this netns over netlink); the hop does the
//! plumbing.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use nix::net::if_::InterfaceFlags;
use nsm_api::connection::Connection;
use nsm_api::mechanism::MechanismExt;
use tokio::time::Instant;

use crate::exit::Failure;
use crate::request::Service;

/// How often to look again.
const POLL: Duration = Duration::from_millis(50);

/// What one answered connection should look like in our netns.
#[derive(Debug, Clone)]
pub struct Expected {
    pub url: String,
    pub interface: String,
    pub src: Vec<IpNet>,
    /// `dst_ip_addrs` as the answer gave them (reported, not checked: they
    /// live on the other side).
    pub dst: Vec<String>,
}

impl Expected {
    /// Reads the interface name (the answer's, else ours) and the addresses.
    pub fn from_answer(svc: &Service, conn: &Connection) -> Result<Expected, Failure> {
        let url = svc.url.to_string();
        let interface = conn
            .mechanism
            .as_ref()
            .and_then(|m| m.interface_name())
            .unwrap_or(&svc.interface)
            .to_owned();
        let ip = conn
            .context
            .as_ref()
            .and_then(|c| c.ip_context.as_ref())
            .cloned()
            .unwrap_or_default();
        let src = ip
            .src_ip_addrs
            .iter()
            .map(|a| {
                parse_net(a).ok_or_else(|| Failure::BadAnswer {
                    url: url.clone(),
                    reason: format!("src_ip_addrs {a:?} is not an address"),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Expected {
            url,
            interface,
            src,
            dst: ip.dst_ip_addrs,
        })
    }

    /// `nsm-1 198.18.0.1/32 -> 198.18.0.0/32`.
    pub fn summary(&self) -> String {
        let join = |v: Vec<String>| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                v.join(",")
            }
        };
        format!(
            "{} {} -> {}",
            self.interface,
            join(self.src.iter().map(ToString::to_string).collect()),
            join(self.dst.clone())
        )
    }
}

/// `198.18.0.1/32`, or a bare address as a host prefix.
fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// What is missing right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    Interface,
    Down,
    Addresses(Vec<IpNet>),
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::Interface => write!(f, "no such interface in this netns"),
            Missing::Down => write!(f, "interface exists but is down"),
            Missing::Addresses(a) => {
                let a: Vec<String> = a.iter().map(ToString::to_string).collect();
                write!(f, "interface is up but lacks {}", a.join(", "))
            }
        }
    }
}

/// Looks once; `Ok(None)` when everything is there.
pub fn check(want: &Expected) -> nix::Result<Option<Missing>> {
    let mut seen = false;
    let mut up = false;
    let mut have = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs()? {
        if ifa.interface_name != want.interface {
            continue;
        }
        seen = true;
        up |= ifa.flags.contains(InterfaceFlags::IFF_UP);
        let (Some(addr), Some(mask)) = (ifa.address, ifa.netmask) else {
            continue;
        };
        let net = if let (Some(a), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            IpNet::new(a.ip().into(), m.ip().to_bits().count_ones() as u8).ok()
        } else if let (Some(a), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            IpNet::new(a.ip().into(), m.ip().to_bits().count_ones() as u8).ok()
        } else {
            None
        };
        have.extend(net);
    }
    if !seen {
        return Ok(Some(Missing::Interface));
    }
    if !up {
        return Ok(Some(Missing::Down));
    }
    let lacking: Vec<IpNet> = want
        .src
        .iter()
        .filter(|w| !have.contains(w))
        .copied()
        .collect();
    Ok((!lacking.is_empty()).then_some(Missing::Addresses(lacking)))
}

/// Waits for every expected interface until `timeout`.
pub async fn wait_all(all: &[Expected], timeout: Duration) -> Result<(), Failure> {
    let deadline = Instant::now() + timeout;
    for want in all {
        loop {
            let missing = check(want).map_err(|e| Failure::Setup(format!("getifaddrs: {e}")))?;
            let Some(missing) = missing else {
                tracing::debug!(interface = %want.interface, "interface ready");
                break;
            };
            if Instant::now() >= deadline {
                return Err(Failure::InterfaceTimeout {
                    url: want.url.clone(),
                    reason: format!("{} not ready after {timeout:?}: {missing}", want.interface),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_seen_with_its_address() {
        let mut lo = Expected {
            url: "kernel://x/lo".into(),
            interface: "lo".into(),
            src: vec!["127.0.0.1/8".parse().unwrap()],
            dst: vec![],
        };
        // Loopback may be down in a bare test netns; then the answer says so.
        match check(&lo).unwrap() {
            None | Some(Missing::Down) => {}
            other => panic!("lo: {other:?}"),
        }
        lo.interface = "nsc-no-such-if".into();
        assert_eq!(check(&lo).unwrap(), Some(Missing::Interface));
    }

    #[test]
    fn summary_and_bare_addresses() {
        assert_eq!(
            parse_net("198.18.0.1"),
            Some("198.18.0.1/32".parse().unwrap())
        );
        assert_eq!(
            parse_net("fd00::1/128"),
            Some("fd00::1/128".parse().unwrap())
        );
        assert_eq!(parse_net("nope"), None);
        let e = Expected {
            url: String::new(),
            interface: "nsm-1".into(),
            src: vec!["198.18.0.1/32".parse().unwrap()],
            dst: vec!["198.18.0.0/32".into()],
        };
        assert_eq!(e.summary(), "nsm-1 198.18.0.1/32 -> 198.18.0.0/32");
    }
}
