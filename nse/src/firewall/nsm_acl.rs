//! NSM's firewall ACL file (cmd-nse-firewall-vpp, `NSM_ACL_CONFIG_PATH`,
//! default `/etc/firewall/config.yaml`): a map from a rule's name to VPP's
//! `acl_types.ACLRule`, keys the Go field names lowercased:
//!
//! ```yaml
//! allow tcp8080:
//!   ispermit: 1                  # 0 deny, 1 permit, 2 permit+reflect
//!   proto: 6                     # IANA number; 0 any (ports ignored)
//!   srcprefix: 10.0.0.0/8        # omitted: 0.0.0.0/0 (IPv4 only, as VPP)
//!   dstprefix: 198.19.0.0/16
//!   srcportoricmptypefirst: 0    # ICMP: the type range
//!   srcportoricmptypelast: 65535
//!   dstportoricmpcodefirst: 8080 # ICMP: the code range
//!   dstportoricmpcodelast: 8080
//! ```
//!
//! NSM reads it leniently (an unknown key such as `is_permit` is dropped,
//! leaving a deny rule); we refuse unknown keys instead. NSM applies the
//! rules in Go map order, which changes from run to run; we apply them in
//! name order. Both permit kinds allow (our rules are stateful anyway). For
//! ICMP only the full type and code ranges are supported (VPP's "any").

use std::collections::BTreeMap;

use forwarder_plugin::rules::PortRange;
use ipnet::IpNet;
use serde::Deserialize;

use super::config::{FirewallRule, Protocol, Verdict};
use crate::mesh_proxy::config::parse_cidr;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AclRule {
    #[serde(default)]
    ispermit: u8,
    #[serde(default)]
    proto: u8,
    srcprefix: Option<String>,
    dstprefix: Option<String>,
    #[serde(default)]
    srcportoricmptypefirst: u16,
    #[serde(default)]
    srcportoricmptypelast: u16,
    #[serde(default)]
    dstportoricmpcodefirst: u16,
    #[serde(default)]
    dstportoricmpcodelast: u16,
    #[serde(default)]
    tcpflagsmask: u8,
    #[serde(default)]
    tcpflagsvalue: u8,
}

/// `[first, last]` as our port list: empty for the whole range.
fn ports(first: u16, last: u16, what: &str) -> Result<Vec<PortRange>, String> {
    match (first, last) {
        (0, 65535) => Ok(Vec::new()),
        (f, l) if f > l => Err(format!("{what}: first {f} is above last {l}")),
        (0, _) => Err(format!(
            "{what}: a range from port 0 is not supported (0-65535 means any)"
        )),
        (f, l) => Ok(vec![PortRange { lo: f, hi: l }]),
    }
}

fn convert(name: &str, r: AclRule) -> Result<FirewallRule, String> {
    let action = match r.ispermit {
        0 => Verdict::Deny,
        1 | 2 => Verdict::Allow,
        n => {
            return Err(format!(
                "{name:?}: ispermit {n} (0 deny, 1 permit, 2 permit+reflect)"
            ));
        }
    };
    let protocol = match r.proto {
        0 => Protocol::Any,
        1 => Protocol::Icmp,
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        58 => Protocol::Icmpv6,
        n => {
            return Err(format!(
                "{name:?}: proto {n} is not supported (0, 1, 6, 17, 58)"
            ));
        }
    };
    if r.tcpflagsmask != 0 || r.tcpflagsvalue != 0 {
        return Err(format!(
            "{name:?}: tcpflagsmask/tcpflagsvalue are not supported"
        ));
    }
    let prefix = |p: Option<String>, key: &str| -> Result<IpNet, String> {
        match p {
            None => Ok("0.0.0.0/0".parse().expect("literal")),
            Some(s) => parse_cidr(&s).map_err(|e| format!("{name:?}: {key}: {e}")),
        }
    };
    let (source_ports, destination_ports) = match protocol {
        Protocol::Tcp | Protocol::Udp => (
            ports(
                r.srcportoricmptypefirst,
                r.srcportoricmptypelast,
                &format!("{name:?}: srcport"),
            )?,
            ports(
                r.dstportoricmpcodefirst,
                r.dstportoricmpcodelast,
                &format!("{name:?}: dstport"),
            )?,
        ),
        Protocol::Icmp | Protocol::Icmpv6 => {
            let any = |f: u16, l: u16| f == 0 && l >= 255;
            if !any(r.srcportoricmptypefirst, r.srcportoricmptypelast)
                || !any(r.dstportoricmpcodefirst, r.dstportoricmpcodelast)
            {
                return Err(format!(
                    "{name:?}: only any ICMP type and code (0-255) is supported"
                ));
            }
            (Vec::new(), Vec::new())
        }
        // VPP ignores ports without a protocol.
        Protocol::Any => (Vec::new(), Vec::new()),
    };
    Ok(FirewallRule {
        action,
        protocol,
        source_cidrs: vec![prefix(r.srcprefix, "srcprefix")?],
        destination_cidrs: vec![prefix(r.dstprefix, "dstprefix")?],
        source_ports,
        destination_ports,
    })
}

/// The file's rules, in name order.
pub fn parse(text: &str) -> Result<Vec<FirewallRule>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let map: BTreeMap<String, AclRule> = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    map.into_iter().map(|(k, r)| convert(&k, r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nsm_example_reads_in_name_order() {
        let rules = parse(
            "allow icmp:\n  ispermit: 1\n  proto: 1\n  srcportoricmptypelast: 65535\n  dstportoricmpcodelast: 65535\n\
             forbid tcp80:\n  proto: 6\n  srcportoricmptypelast: 65535\n  dstportoricmpcodefirst: 80\n  dstportoricmpcodelast: 80\n\
             allow tcp8080:\n  ispermit: 1\n  proto: 6\n  srcportoricmptypelast: 65535\n  dstportoricmpcodefirst: 8080\n  dstportoricmpcodelast: 8080\n",
        )
        .unwrap();
        let summary: Vec<_> = rules
            .iter()
            .map(|r| (r.action, r.protocol, r.destination_ports.clone()))
            .collect();
        assert_eq!(
            summary,
            [
                (Verdict::Allow, Protocol::Icmp, vec![]),
                (Verdict::Allow, Protocol::Tcp, vec![PortRange::single(8080)]),
                (Verdict::Deny, Protocol::Tcp, vec![PortRange::single(80)]),
            ]
        );
        // An omitted prefix is VPP's zero prefix: IPv4 any.
        assert_eq!(
            rules[0].source_cidrs,
            ["0.0.0.0/0".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn what_nsm_would_drop_silently_is_refused() {
        for (text, want) in [
            ("r:\n  is_permit: 1\n", "unknown field `is_permit`"),
            ("r:\n  ispermit: 3\n", "ispermit 3"),
            ("r:\n  proto: 47\n", "proto 47 is not supported"),
            (
                "r:\n  proto: 6\n  srcportoricmptypelast: 65535\n  dstportoricmpcodefirst: 90\n  dstportoricmpcodelast: 80\n",
                "first 90 is above last 80",
            ),
            ("r:\n  proto: 6\n", "srcport: a range from port 0"),
            (
                "r:\n  proto: 1\n  srcportoricmptypefirst: 8\n  srcportoricmptypelast: 8\n",
                "only any ICMP type",
            ),
            ("r:\n  dstprefix: nope\n", "dstprefix"),
            ("r:\n  proto: 6\n  tcpflagsmask: 2\n", "tcpflagsmask"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
