//! Placement proxy: what the client's side sends to the endpoint, in one of
//! two forms (the policy; the forwarder installs it):
//!
//! * method `rules`: a [`CaptureSpec`] in `extra_context` — the forwarder
//!   marks TCP connections the client starts (and DNS when asked) to
//!   destinations not excluded, and routes only those via the endpoint;
//! * method `policies`: NSM's `ip_context.policies`, which every NSM kernel
//!   forwarder installs as `ip rule ipproto 6 dport <ports> lookup <table>`
//!   with the capture CIDRs minus the exclusions in that table, via the
//!   endpoint's address. A rule cannot see whether a packet opens a
//!   connection or answers one, so the ports are what keeps the replies of
//!   connections the client accepted out (their destination port is the
//!   peer's, e.g. from Linux's ephemeral range 32768-60999).
//!
//! The client's own routes (a pod's default route, its DNS) are never
//! touched: only the point-to-point route to the endpoint is added to them.

use std::net::IpAddr;

use forwarder_plugin::hop::MAX_POLICY_ROUTES;
use ipnet::IpNet;
use nsm_api::connectioncontext::{IpContext, PolicyRoute, Route};
use nsm_api::contract::{CaptureSpec, PortRange};

use super::config::{CaptureConfig, POLICY_DEFAULT_PORTS};

/// `nets` without the addresses in `holes`: the fewest prefixes that cover
/// what is left. Near-linear: the holes are sorted and de-nested once, and
/// each net is split only along the holes inside it (at most one level per
/// prefix bit of each hole).
pub fn subtract(nets: &[IpNet], holes: &[IpNet]) -> Vec<IpNet> {
    let mut holes: Vec<IpNet> = holes.iter().map(IpNet::trunc).collect();
    holes.sort_by_key(|h| (h.addr(), h.prefix_len()));
    // Sorted by address, a hole inside another comes right after it.
    let mut flat: Vec<IpNet> = Vec::with_capacity(holes.len());
    for h in holes {
        if !flat.last().is_some_and(|last| last.contains(&h)) {
            flat.push(h);
        }
    }
    let mut out = Vec::new();
    for net in nets.iter().map(IpNet::trunc) {
        if out.contains(&net) {
            continue;
        }
        let lo = flat.partition_point(|h| h.addr() < net.network() && !h.contains(&net));
        let inside: Vec<IpNet> = flat[lo..]
            .iter()
            .take_while(|h| h.contains(&net) || net.contains(&h.network()))
            .copied()
            .collect();
        split(net, &inside, &mut out);
    }
    out
}

/// Emits `net` minus `holes` (sorted, non-nested, each overlapping `net`).
fn split(net: IpNet, holes: &[IpNet], out: &mut Vec<IpNet>) {
    if holes.is_empty() {
        out.push(net);
        return;
    }
    if holes.iter().any(|h| h.contains(&net)) {
        return;
    }
    let mut halves = net
        .subnets(net.prefix_len() + 1)
        .expect("a net holding a longer prefix can be split");
    let (a, b) = (
        halves.next().expect("two halves"),
        halves.next().expect("two halves"),
    );
    let mid = holes.partition_point(|h| a.contains(&h.network()));
    split(a, &holes[..mid], out);
    split(b, &holes[mid..], out);
}

/// The endpoint's address of each family (without prefix), the next hop
/// for the client.
fn next_hops(ip: &IpContext) -> (Option<IpAddr>, Option<IpAddr>) {
    let mut v4 = None;
    let mut v6 = None;
    for a in ip
        .dst_ip_addrs
        .iter()
        .filter_map(|a| a.parse::<IpNet>().ok().map(|n| n.addr()))
    {
        match a {
            IpAddr::V4(_) => v4 = v4.or(Some(a)),
            IpAddr::V6(_) => v6 = v6.or(Some(a)),
        }
    }
    (v4, v6)
}

/// Whether the connection has an IPv6 address on the endpoint's side.
pub fn has_ipv6(ip: &IpContext) -> bool {
    next_hops(ip).1.is_some()
}

/// Method `rules`: the spec the forwarder applies in the client's namespace.
pub fn spec(config: &CaptureConfig, exclude: &[IpNet]) -> CaptureSpec {
    let mut exclude_cidrs = config.exclude_cidrs.clone();
    exclude_cidrs.extend(exclude.iter().copied());
    CaptureSpec {
        cidrs: config.cidrs.clone(),
        exclude_cidrs,
        ports: config.ports.clone(),
        dns: config.dns,
        ..CaptureSpec::default()
    }
}

/// Method `policies`: NSM policy routes for `ip` — per port range (and for
/// DNS), the capture CIDRs minus the exclusions via the endpoint's address
/// of their family. Err: more routes than a forwarder accepts.
pub fn policies(
    ip: &IpContext,
    config: &CaptureConfig,
    exclude: &[IpNet],
) -> Result<Vec<PolicyRoute>, String> {
    let (v4, v6) = next_hops(ip);
    let mut holes = config.exclude_cidrs.clone();
    holes.extend(exclude.iter().copied());
    let routes: Vec<Route> = subtract(&config.cidrs, &holes)
        .into_iter()
        .filter_map(|net| {
            let hop = match net {
                IpNet::V4(_) => v4,
                IpNet::V6(_) => v6,
            }?;
            Some(Route {
                prefix: net.to_string(),
                next_hop: hop.to_string(),
            })
        })
        .collect();
    if routes.is_empty() {
        return Ok(Vec::new());
    }
    let ports = if config.ports.is_empty() {
        vec![POLICY_DEFAULT_PORTS]
    } else {
        config.ports.clone()
    };
    let policy = |proto: &str, port: PortRange| PolicyRoute {
        proto: proto.to_owned(),
        dst_port: port.to_string(),
        routes: routes.clone(),
        ..Default::default()
    };
    let mut out: Vec<PolicyRoute> = ports.iter().map(|p| policy("6", *p)).collect();
    if config.dns {
        out.push(policy("17", PortRange::single(53)));
        if !ports.iter().any(|p| p.contains(53)) {
            out.push(policy("6", PortRange::single(53)));
        }
    }
    let total = out.len() * routes.len();
    if out.len() > forwarder_plugin::hop::MAX_POLICIES || total > MAX_POLICY_ROUTES {
        return Err(format!(
            "method policies needs {} policy routes with {} routes each ({total} routes): a \
             forwarder takes at most {} policies and {MAX_POLICY_ROUTES} routes; list fewer \
             capture.ports or exclusions, or use method rules",
            out.len(),
            routes.len(),
            forwarder_plugin::hop::MAX_POLICIES,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn strs(list: &[IpNet]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn subtract_splits_around_holes() {
        assert_eq!(
            strs(&subtract(&nets(&["0.0.0.0/0"]), &nets(&["128.0.0.0/2"]))),
            ["0.0.0.0/1", "192.0.0.0/2"]
        );
        let left = subtract(&nets(&["0.0.0.0/0"]), &nets(&["10.0.0.0/8"]));
        assert_eq!(left.len(), 8);
        for a in ["9.255.255.255", "11.0.0.0", "198.19.1.1", "255.255.255.255"] {
            let a: IpAddr = a.parse().unwrap();
            assert_eq!(left.iter().filter(|n| n.contains(&a)).count(), 1, "{a}");
        }
        assert!(
            !left
                .iter()
                .any(|n| n.contains(&"10.1.2.3".parse::<IpAddr>().unwrap()))
        );
        // Holes of the other family, or outside, change nothing; a hole
        // covering everything leaves nothing; nested holes count once.
        assert_eq!(
            strs(&subtract(
                &nets(&["198.19.0.0/16"]),
                &nets(&["fd00::/8", "10.0.0.0/8"])
            )),
            ["198.19.0.0/16"]
        );
        assert!(subtract(&nets(&["198.19.0.0/16"]), &nets(&["198.0.0.0/8"])).is_empty());
        assert_eq!(subtract(&nets(&["::/0"]), &nets(&["fd00::/8"])).len(), 8);
        assert_eq!(
            subtract(&nets(&["0.0.0.0/0"]), &nets(&["10.0.0.0/8", "10.1.0.0/16"])),
            subtract(&nets(&["0.0.0.0/0"]), &nets(&["10.0.0.0/8"]))
        );
    }

    /// The result covers exactly the addresses of `nets` not in `holes`,
    /// checked at every hole's edges.
    #[test]
    fn subtract_of_many_holes_is_exact_and_fast() {
        let holes: Vec<IpNet> = (0..20_000u32)
            .map(|i| IpNet::from(IpAddr::from((0xc612_0000u32 + i * 7).to_be_bytes())))
            .collect();
        let started = std::time::Instant::now();
        let left = subtract(&nets(&["0.0.0.0/0"]), &holes);
        let took = started.elapsed();
        for (i, h) in holes.iter().enumerate().step_by(97) {
            let a = h.addr();
            assert!(!left.iter().any(|n| n.contains(&a)), "hole {i} {a}");
            let IpAddr::V4(v) = a else { unreachable!() };
            let next = IpAddr::from((u32::from(v) + 1).to_be_bytes());
            assert_eq!(
                left.iter().filter(|n| n.contains(&next)).count(),
                1,
                "{next}"
            );
        }
        // Not a speed assertion (benches do that): a guard against going
        // quadratic again, which took minutes here.
        assert!(took.as_secs() < 20, "{took:?}");
    }

    fn ctx(dst: &[&str]) -> IpContext {
        IpContext {
            dst_ip_addrs: dst.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    fn routes(p: &PolicyRoute) -> Vec<(&str, &str)> {
        p.routes
            .iter()
            .map(|r| (r.prefix.as_str(), r.next_hop.as_str()))
            .collect()
    }

    #[test]
    fn policies_capture_tcp_below_the_ephemeral_range_via_the_endpoint() {
        let c = CaptureConfig::default();
        let p = policies(&ctx(&["198.18.0.0/32", "fd00::a/128"]), &c, &[]).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].proto.as_str(), p[0].dst_port.as_str()),
            ("6", "1-32767")
        );
        assert!(p[0].from.is_empty() && p[0].src_port.is_empty());
        assert_eq!(
            routes(&p[0]),
            [("0.0.0.0/0", "198.18.0.0"), ("::/0", "fd00::a")]
        );
        // Without IPv6 on the endpoint's side, no IPv6 route.
        let p = policies(&ctx(&["198.18.0.0/32"]), &c, &[]).unwrap();
        assert_eq!(routes(&p[0]), [("0.0.0.0/0", "198.18.0.0")]);
    }

    #[test]
    fn policies_honour_ports_dns_and_exclusions() {
        let c = CaptureConfig {
            cidrs: nets(&["0.0.0.0/0"]),
            exclude_cidrs: nets(&["128.0.0.0/1"]),
            ports: vec!["80".parse().unwrap(), "443".parse().unwrap()],
            dns: true,
            ..Default::default()
        };
        let p = policies(&ctx(&["198.18.0.0/32"]), &c, &nets(&["64.0.0.0/2"])).unwrap();
        let sel: Vec<(&str, &str)> = p
            .iter()
            .map(|x| (x.proto.as_str(), x.dst_port.as_str()))
            .collect();
        assert_eq!(sel, [("6", "80"), ("6", "443"), ("17", "53"), ("6", "53")]);
        for x in &p {
            assert_eq!(routes(x), [("0.0.0.0/2", "198.18.0.0")]);
        }
        // Everything excluded: nothing to capture, no policy.
        let all = nets(&["0.0.0.0/0"]);
        assert!(
            policies(&ctx(&["198.18.0.0/32"]), &c, &all)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn too_many_routes_for_a_forwarder_is_an_error() {
        let holes: Vec<IpNet> = (0..2_000u32)
            .map(|i| IpNet::from(IpAddr::from((0xc612_0000u32 + i * 7).to_be_bytes())))
            .collect();
        let e = policies(&ctx(&["198.18.0.0/32"]), &CaptureConfig::default(), &holes).unwrap_err();
        assert!(e.contains("use method rules"), "{e}");
    }

    #[test]
    fn the_rules_spec_carries_config_and_label_exclusions() {
        let c = CaptureConfig {
            exclude_cidrs: nets(&["10.0.0.0/8"]),
            dns: true,
            ..Default::default()
        };
        let s = spec(&c, &nets(&["198.19.0.0/16"]));
        assert_eq!(strs(&s.exclude_cidrs), ["10.0.0.0/8", "198.19.0.0/16"]);
        assert!(s.dns);
        s.validate().unwrap();
    }
}
