//! Client-side capture by intent: what a client namespace sends to an
//! endpoint whose proxy serves it — TCP connections the client starts (and,
//! when asked, DNS) to destinations not excluded — and nothing else: never
//! replies to connections the client accepted, never other UDP or ICMP,
//! never loopback. The client keeps its own routes (a pod's eth0 default
//! route, its DNS, its kubelet probes); only marked packets take the
//! connection's routing table.
//!
//! A [`CaptureSpec`] is policy (the endpoint decides it and sends it to the
//! forwarder as JSON); [`Plan::capture`] is its mechanism in the client's
//! namespace, for one connection's interface and mark:
//!
//! ```text
//! mangle OUTPUT (route):  oifname "lo" return
//!                         ct mark M meta mark set M     (later packets of a captured connection)
//!                         meta mark M accept
//!                         ip daddr <excluded> return    (each excludeCidr)
//!                         [ip daddr <cidr>] jump CAPTURE
//! mangle CAPTURE:         tcp [dport P] ct state new meta mark set M
//!                         udp dport 53 ct state new meta mark set M   (dns)
//!                         meta mark M ct mark set meta mark
//! mangle PREROUTING:      ct mark M meta mark set M     (replies, for src_valid_mark)
//! nat POSTROUTING:        oifname <iface> meta mark M masquerade
//! ```
//!
//! The forwarder adds the rest, which is not a firewall rule: `ip rule
//! fwmark M lookup T` and, in table T, the capture CIDRs via the endpoint's
//! address on the interface. A changed mark re-routes the packet (mangle
//! OUTPUT is a route chain); its source was chosen by the pod's own route,
//! hence the masquerade to the interface's address, which conntrack undoes
//! for the replies.

use nsm_api::contract::capture::{CaptureError, CaptureSpec};

use super::plan::{
    Action, ChainId, ChainRef, CtState, Family, Hook, L4, Match, OwnChain, Plan, Rule, Table,
};
use super::spec::{Mark, validate_interface};

fn chain(table: Table, chain: ChainRef) -> ChainId {
    ChainId { table, chain }
}

impl Plan {
    /// The rules that capture `spec`'s traffic of a client namespace for a
    /// connection on `interface` with mark `mark` (see the module doc);
    /// `families`: the address families the connection has (nothing of
    /// another family is captured). The spec must be valid.
    pub fn capture(
        spec: &CaptureSpec,
        interface: &str,
        mark: u32,
        families: &[Family],
    ) -> Result<Plan, CaptureError> {
        spec.validate()?;
        validate_interface(interface).map_err(|why| CaptureError::Invalid {
            field: "interface",
            why,
        })?;
        if mark == 0 {
            return Err(CaptureError::Invalid {
                field: "mark",
                why: "0 marks nothing".into(),
            });
        }
        let ipv6 = families.contains(&Family::V6);
        // An inet table sees both families: without IPv6 addresses, IPv6
        // must not even enter the chains.
        let base_family = (!ipv6).then_some(Family::V4);
        let full = Mark {
            value: mark,
            mask: u32::MAX,
        };
        let out = chain(Table::Mangle, ChainRef::Base(Hook::Output));
        let cap = chain(Table::Mangle, ChainRef::Own(OwnChain::Capture));
        let mut rules = Vec::new();
        let mut push = |chain, family, matches, action| {
            rules.push(Rule {
                chain,
                family,
                matches,
                action,
            })
        };
        push(
            out,
            base_family,
            vec![Match::Oif("lo".into())],
            Action::Return,
        );
        push(
            out,
            base_family,
            vec![Match::ConnMark(mark)],
            Action::SetMark(mark),
        );
        push(out, base_family, vec![Match::Mark(full)], Action::Accept);
        for net in &spec.exclude_cidrs {
            let f = Family::of(net);
            if families.contains(&f) {
                push(out, Some(f), vec![Match::Daddr(*net)], Action::Return);
            }
        }
        for net in &spec.cidrs {
            let f = Family::of(net);
            if families.contains(&f) {
                let m = if net.prefix_len() == 0 {
                    Vec::new()
                } else {
                    vec![Match::Daddr(*net)]
                };
                push(out, Some(f), m, Action::Jump(OwnChain::Capture));
            }
        }
        let new = Match::Ct(CtState::New);
        let tcp = Match::Proto(L4::Tcp);
        if spec.ports.is_empty() {
            push(
                cap,
                None,
                vec![tcp.clone(), new.clone()],
                Action::SetMark(mark),
            );
        }
        for r in &spec.ports {
            let port = if r.lo == r.hi {
                Match::Dport(r.lo)
            } else {
                Match::DportRange(r.lo, r.hi)
            };
            push(
                cap,
                None,
                vec![tcp.clone(), port, new.clone()],
                Action::SetMark(mark),
            );
        }
        if spec.dns {
            push(
                cap,
                None,
                vec![Match::Proto(L4::Udp), Match::Dport(53), new.clone()],
                Action::SetMark(mark),
            );
            if !spec.tcp_port_captured(53) {
                push(
                    cap,
                    None,
                    vec![tcp, Match::Dport(53), new],
                    Action::SetMark(mark),
                );
            }
        }
        push(cap, None, vec![Match::Mark(full)], Action::SaveMark);
        push(
            chain(Table::Mangle, ChainRef::Base(Hook::Prerouting)),
            base_family,
            vec![Match::ConnMark(mark)],
            Action::SetMark(mark),
        );
        push(
            chain(Table::Nat, ChainRef::Base(Hook::Postrouting)),
            base_family,
            vec![Match::Oif(interface.to_owned()), Match::Mark(full)],
            Action::Masquerade,
        );
        Ok(Plan {
            ipv6,
            rules,
            policy_routes: Vec::new(),
            interfaces: None,
        })
    }

    /// An endpoint's guard for a plan with an interface set (its clients'
    /// links): what arrives there for another host is refused unless it is
    /// TCP (the proxy's) or part of a connection already accepted — the
    /// endpoint never routes a client's traffic onward itself, and says so
    /// instead of dropping it silently. With `dns_port`, DNS arriving there
    /// (UDP and TCP port 53) is redirected to that local port first.
    pub fn with_endpoint_guard(mut self, dns_port: Option<u16>) -> Plan {
        let family = (!self.ipv6).then_some(Family::V4);
        let nat_pre = chain(Table::Nat, ChainRef::Base(Hook::Prerouting));
        if let Some(port) = dns_port {
            let dns: Vec<Rule> = [L4::Udp, L4::Tcp]
                .into_iter()
                .map(|l4| Rule {
                    chain: nat_pre,
                    family,
                    matches: vec![Match::IifInSet, Match::Proto(l4), Match::Dport(53)],
                    action: Action::Redirect(port),
                })
                .collect();
            // Before the inbound jump, which takes all TCP to the proxy.
            self.rules.splice(0..0, dns);
        }
        let guard = chain(Table::Mangle, ChainRef::Own(OwnChain::Guard));
        let rule = |chain, family, matches, action| Rule {
            chain,
            family,
            matches,
            action,
        };
        let mut added = vec![rule(
            chain(Table::Mangle, ChainRef::Base(Hook::Prerouting)),
            None,
            vec![Match::IifInSet, Match::ForeignUnicastDaddr],
            Action::Jump(OwnChain::Guard),
        )];
        added.push(rule(
            guard,
            None,
            vec![Match::Proto(L4::Tcp)],
            Action::Return,
        ));
        if dns_port.is_some() {
            added.push(rule(
                guard,
                None,
                vec![Match::Proto(L4::Udp), Match::Dport(53)],
                Action::Return,
            ));
        }
        added.push(rule(
            guard,
            None,
            vec![Match::Ct(CtState::EstablishedRelated)],
            Action::Return,
        ));
        added.push(rule(guard, None, vec![], Action::Reject));
        self.rules.extend(added);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::render::nft_rule_body;
    use nsm_api::contract::capture::{MAX_EXCLUDE_CIDRS, PortRange};

    fn texts(plan: &Plan) -> Vec<String> {
        plan.rules
            .iter()
            .map(|r| {
                format!(
                    "{} {}",
                    crate::rules::names::nft_chain(r.chain),
                    nft_rule_body(r)
                )
            })
            .collect()
    }

    #[test]
    fn default_spec_captures_new_tcp_to_everywhere_of_each_family() {
        let p =
            Plan::capture(&CaptureSpec::default(), "nsm-1", 0x6d70_0010, &[Family::V4]).unwrap();
        assert!(!p.ipv6);
        let t = texts(&p);
        assert_eq!(
            t,
            [
                "MANGLE_OUTPUT meta nfproto ipv4 oifname \"lo\" return",
                "MANGLE_OUTPUT meta nfproto ipv4 ct mark 0x6d700010 meta mark set 0x6d700010",
                "MANGLE_OUTPUT meta nfproto ipv4 meta mark 0x6d700010 accept",
                "MANGLE_OUTPUT meta nfproto ipv4 jump mangle_capture",
                "mangle_capture meta l4proto tcp ct state new meta mark set 0x6d700010",
                "mangle_capture meta mark 0x6d700010 ct mark set meta mark",
                "MANGLE_PREROUTING meta nfproto ipv4 ct mark 0x6d700010 meta mark set 0x6d700010",
                "NAT_POSTROUTING meta nfproto ipv4 oifname \"nsm-1\" meta mark 0x6d700010 masquerade",
            ]
        );
        let both = Plan::capture(
            &CaptureSpec::default(),
            "nsm-1",
            7,
            &[Family::V4, Family::V6],
        )
        .unwrap();
        assert!(both.ipv6);
        let jumps: Vec<_> = texts(&both)
            .into_iter()
            .filter(|t| t.contains("jump mangle_capture"))
            .collect();
        assert_eq!(
            jumps,
            [
                "MANGLE_OUTPUT meta nfproto ipv4 jump mangle_capture",
                "MANGLE_OUTPUT meta nfproto ipv6 jump mangle_capture"
            ]
        );
    }

    #[test]
    fn exclusions_ports_and_dns() {
        let spec = CaptureSpec {
            cidrs: vec![
                "198.19.0.0/16".parse().unwrap(),
                "fd00::/8".parse().unwrap(),
            ],
            exclude_cidrs: vec![
                "198.19.53.0/24".parse().unwrap(),
                "fd00:53::/64".parse().unwrap(),
            ],
            ports: vec!["80".parse().unwrap(), "8000-8999".parse().unwrap()],
            dns: true,
            ..Default::default()
        };
        let t = texts(&Plan::capture(&spec, "nsm-1", 9, &[Family::V4]).unwrap());
        assert!(
            t.contains(&"MANGLE_OUTPUT meta nfproto ipv4 ip daddr 198.19.53.0/24 return".into())
        );
        assert!(t.contains(
            &"MANGLE_OUTPUT meta nfproto ipv4 ip daddr 198.19.0.0/16 jump mangle_capture".into()
        ));
        assert!(!t.iter().any(|r| r.contains("fd00")), "no IPv6: {t:?}");
        assert!(t.contains(
            &"mangle_capture meta l4proto tcp tcp dport 80 ct state new meta mark set 0x9".into()
        ));
        assert!(t.contains(&"mangle_capture meta l4proto tcp tcp dport 8000-8999 ct state new meta mark set 0x9".into()));
        assert!(t.contains(
            &"mangle_capture meta l4proto udp udp dport 53 ct state new meta mark set 0x9".into()
        ));
        assert!(t.contains(
            &"mangle_capture meta l4proto tcp tcp dport 53 ct state new meta mark set 0x9".into()
        ));
        // The exclusion comes before the capture jump.
        let excl = t.iter().position(|r| r.contains("198.19.53.0/24")).unwrap();
        let jump = t.iter().position(|r| r.contains("jump")).unwrap();
        assert!(excl < jump);
    }

    #[test]
    fn bad_specs_are_refused() {
        for (json, want) in [
            (r#"{"version":2}"#, "unsupported capture spec version 2"),
            (r#"{"cidrs":["10.0.0.1/8"]}"#, "host bits"),
            (r#"{"ports":["90-80"]}"#, "ends before it starts"),
            (r#"{"ports":[0]}"#, "out of range"),
            (r#"{"ports":["http"]}"#, "not a port"),
            (r#"{"via":"x"}"#, "unknown field"),
        ] {
            let e = CaptureSpec::from_json(json).unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
        let many = CaptureSpec {
            exclude_cidrs: vec!["10.0.0.0/8".parse().unwrap(); MAX_EXCLUDE_CIDRS + 1],
            ..Default::default()
        };
        assert!(many.validate().unwrap_err().to_string().contains("at most"));
        assert!(Plan::capture(&CaptureSpec::default(), "bad name!", 1, &[Family::V4]).is_err());
        assert!(Plan::capture(&CaptureSpec::default(), "nsm-1", 0, &[Family::V4]).is_err());
    }

    #[test]
    fn json_round_trip_and_port_forms() {
        let spec = CaptureSpec {
            ports: vec![PortRange::single(443), "1-32767".parse().unwrap()],
            ..Default::default()
        };
        let j = spec.to_json();
        assert!(j.contains(r#""ports":["443","1-32767"]"#), "{j}");
        assert_eq!(CaptureSpec::from_json(&j).unwrap(), spec);
        let n = CaptureSpec::from_json(r#"{"ports":[80, "81"]}"#).unwrap();
        assert_eq!(n.ports, [PortRange::single(80), PortRange::single(81)]);
    }

    #[test]
    fn endpoint_guard_rejects_foreign_non_tcp_on_client_links() {
        let spec = crate::rules::RedirectSpec {
            include_outbound_cidrs: crate::rules::spec::Selection::List(vec![]),
            ..Default::default()
        };
        let plan = Plan::for_interfaces(&spec, ["nsm-a".to_owned()])
            .unwrap()
            .with_endpoint_guard(Some(15053));
        let t = texts(&plan);
        assert_eq!(
            &t[..2],
            [
                "NAT_PREROUTING meta nfproto ipv4 iifname @include_ifaces meta l4proto udp udp dport 53 redirect to :15053",
                "NAT_PREROUTING meta nfproto ipv4 iifname @include_ifaces meta l4proto tcp tcp dport 53 redirect to :15053",
            ]
        );
        let tail: Vec<&String> = t.iter().rev().take(5).rev().collect();
        assert_eq!(
            tail,
            [
                "MANGLE_PREROUTING iifname @include_ifaces fib daddr type unicast jump mangle_guard",
                "mangle_guard meta l4proto tcp return",
                "mangle_guard meta l4proto udp udp dport 53 return",
                "mangle_guard ct state established,related return",
                "mangle_guard reject with icmpx admin-prohibited",
            ]
        );
    }
}
