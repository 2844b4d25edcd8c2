//! Policy-routing rules (`ip rule`): which packets look up which routing
//! table, by firewall mark, source prefix, IP protocol and ports (what NSM's
//! `PolicyRoute` can say). Ours carry routing protocol [`RULE_PROTO`] and an
//! explicit priority, so `ip rule` shows whose they are and adding one
//! twice is recognised (the kernel compares priorities too).

use ipnet::IpNet;
use nix::errno::Errno;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::packet_route::rule::{
    RuleAction, RuleAttribute, RuleHeader, RuleMessage, RulePortRange,
};
use rtnetlink::packet_route::{AddressFamily, IpProtocol, RouteNetlinkMessage};
use serde::{Deserialize, Serialize};

use super::{LinkError, Links, Result, is_errno};

/// Routing protocol number of the rules this crate adds per connection
/// (`ip rule` prints `proto 158`). The redirect rules' TPROXY policy routes
/// use 157 ([`crate::rules::RT_PROTO`]), which their cleanup removes
/// wholesale; these are removed one by one.
pub const RULE_PROTO: u8 = 158;

/// Priority of our rules: after `local` (0), before `main` (32766).
pub const RULE_PRIORITY: u32 = 32000;

/// One rule: packets of its family matching every selector set look up
/// `table`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RuleSpec {
    /// IPv6 rule (`ip -6 rule`); IPv4 otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ipv6: bool,
    /// Source prefix (`from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<IpNet>,
    /// Exact firewall mark (`fwmark M/0xffffffff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fwmark: Option<u32>,
    /// IP protocol number (`ipproto`, e.g. 6 for TCP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipproto: Option<u8>,
    /// Source port range, inclusive (`sport`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sport: Option<(u16, u16)>,
    /// Destination port range, inclusive (`dport`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dport: Option<(u16, u16)>,
    pub table: u32,
    pub priority: u32,
}

impl RuleSpec {
    /// A rule looking up `table` for everything of the family, at [`RULE_PRIORITY`].
    pub fn to_table(ipv6: bool, table: u32) -> RuleSpec {
        RuleSpec {
            ipv6,
            from: None,
            fwmark: None,
            ipproto: None,
            sport: None,
            dport: None,
            table,
            priority: RULE_PRIORITY,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(LinkError::InvalidRequest(format!("rule {self}: {why}")));
        if let Some(from) = self.from {
            if from.addr().is_ipv6() != self.ipv6 {
                return bad(format!("from {from} is not of the rule's family"));
            }
            if from != from.trunc() {
                return bad(format!("from {from} has host bits set"));
            }
        }
        if matches!(self.table, 0 | 253..=255) {
            return bad(format!(
                "table {} is reserved (0 unspec, 253 default, 254 main, 255 local)",
                self.table
            ));
        }
        for (name, range) in [("sport", self.sport), ("dport", self.dport)] {
            if let Some((lo, hi)) = range
                && (lo == 0 || lo > hi)
            {
                return bad(format!("{name} {lo}-{hi} is not a port range"));
            }
        }
        if (self.sport.is_some() || self.dport.is_some()) && self.ipproto.is_none() {
            return bad("ports need an ipproto".into());
        }
        Ok(())
    }

    fn message(&self) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header = RuleHeader {
            family: if self.ipv6 {
                AddressFamily::Inet6
            } else {
                AddressFamily::Inet
            },
            // Tables above 255 only fit in FRA_TABLE.
            table: u8::try_from(self.table).unwrap_or(0),
            action: RuleAction::ToTable,
            ..Default::default()
        };
        let a = &mut m.attributes;
        if let Some(from) = self.from {
            m.header.src_len = from.prefix_len();
            a.push(RuleAttribute::Source(from.addr()));
        }
        if let Some(mark) = self.fwmark {
            a.push(RuleAttribute::FwMark(mark));
            a.push(RuleAttribute::FwMask(u32::MAX));
        }
        if let Some(p) = self.ipproto {
            a.push(RuleAttribute::IpProtocol(IpProtocol::from(p)));
        }
        if let Some((start, end)) = self.sport {
            a.push(RuleAttribute::SourcePortRange(RulePortRange { start, end }));
        }
        if let Some((start, end)) = self.dport {
            a.push(RuleAttribute::DestinationPortRange(RulePortRange {
                start,
                end,
            }));
        }
        a.push(RuleAttribute::Table(self.table));
        a.push(RuleAttribute::Priority(self.priority));
        a.push(RuleAttribute::Protocol(RouteProtocol::from(RULE_PROTO)));
        m
    }

    /// One of our rules as the kernel dumped it; `None` for anyone else's.
    fn parse(m: &RuleMessage) -> Option<RuleSpec> {
        let mut spec = RuleSpec::to_table(
            m.header.family == AddressFamily::Inet6,
            u32::from(m.header.table),
        );
        spec.priority = 0;
        let mut ours = false;
        for a in &m.attributes {
            match a {
                RuleAttribute::Protocol(p) => ours = u8::from(*p) == RULE_PROTO,
                RuleAttribute::Source(ip) => {
                    spec.from = IpNet::new(*ip, m.header.src_len).ok();
                }
                RuleAttribute::FwMark(v) => spec.fwmark = Some(*v),
                RuleAttribute::IpProtocol(p) => spec.ipproto = Some(u8::from(*p)),
                RuleAttribute::SourcePortRange(r) => spec.sport = Some((r.start, r.end)),
                RuleAttribute::DestinationPortRange(r) => spec.dport = Some((r.start, r.end)),
                RuleAttribute::Table(t) => spec.table = *t,
                RuleAttribute::Priority(p) => spec.priority = *p,
                _ => {}
            }
        }
        ours.then_some(spec)
    }
}

impl std::fmt::Display for RuleSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pref {}",
            if self.ipv6 { "-6" } else { "-4" },
            self.priority
        )?;
        if let Some(n) = self.from {
            write!(f, " from {n}")?;
        }
        if let Some(m) = self.fwmark {
            write!(f, " fwmark {m:#x}")?;
        }
        if let Some(p) = self.ipproto {
            write!(f, " ipproto {p}")?;
        }
        for (name, r) in [("sport", self.sport), ("dport", self.dport)] {
            match r {
                Some((lo, hi)) if lo == hi => write!(f, " {name} {lo}")?,
                Some((lo, hi)) => write!(f, " {name} {lo}-{hi}")?,
                None => {}
            }
        }
        write!(f, " lookup {}", self.table)
    }
}

impl Links {
    /// Adds `rule`; `Ok(false)` if that very rule is already there.
    pub async fn add_rule(&self, rule: &RuleSpec) -> Result<bool> {
        rule.validate()?;
        match self
            .ack(
                RouteNetlinkMessage::NewRule(rule.message()),
                NLM_F_CREATE | NLM_F_EXCL,
            )
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, Errno::EEXIST) => Ok(false),
            Err(e) => Err(self.kernel_err(format!("add rule {rule}"), e)),
        }
    }

    /// Removes `rule`; `Ok(false)` if it was not there.
    pub async fn del_rule(&self, rule: &RuleSpec) -> Result<bool> {
        rule.validate()?;
        match self
            .ack(RouteNetlinkMessage::DelRule(rule.message()), 0)
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, Errno::ENOENT) => Ok(false),
            Err(e) => Err(self.kernel_err(format!("delete rule {rule}"), e)),
        }
    }

    /// Our rules ([`RULE_PROTO`]) of both families.
    pub async fn rules(&self) -> Result<Vec<RuleSpec>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = RuleMessage::default();
            req.header.family = family;
            let replies = self
                .get(RouteNetlinkMessage::GetRule(req), true)
                .await
                .map_err(|e| self.kernel_err("list rules", e))?;
            out.extend(replies.iter().filter_map(|r| match r {
                RouteNetlinkMessage::NewRule(m) => RuleSpec::parse(m),
                _ => None,
            }));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_and_display() {
        let mut r = RuleSpec::to_table(false, 0x6d70_0010);
        r.fwmark = Some(0x6d70_0010);
        assert!(r.validate().is_ok());
        assert_eq!(
            r.to_string(),
            "-4 pref 32000 fwmark 0x6d700010 lookup 1836056592"
        );
        let mut p = RuleSpec::to_table(false, 7);
        p.ipproto = Some(6);
        p.dport = Some((1, 32767));
        assert_eq!(
            p.to_string(),
            "-4 pref 32000 ipproto 6 dport 1-32767 lookup 7"
        );
        assert!(p.validate().is_ok());
        for bad in [
            RuleSpec {
                from: Some("fd00::/8".parse().unwrap()),
                ..p.clone()
            },
            RuleSpec {
                from: Some("10.0.0.1/8".parse().unwrap()),
                ..p.clone()
            },
            RuleSpec {
                table: 254,
                ..p.clone()
            },
            RuleSpec {
                dport: Some((9, 8)),
                ..p.clone()
            },
            RuleSpec {
                ipproto: None,
                ..p.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn message_round_trips_through_parse() {
        let r = RuleSpec {
            ipv6: true,
            from: Some("fd00:1::/64".parse().unwrap()),
            fwmark: Some(9),
            ipproto: Some(17),
            sport: Some((1000, 2000)),
            dport: Some((53, 53)),
            table: 1000,
            priority: RULE_PRIORITY,
        };
        assert_eq!(RuleSpec::parse(&r.message()), Some(r));
    }
}
