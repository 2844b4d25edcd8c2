//! Placement proxy: the routes that send the client's traffic to the
//! endpoint — each capture CIDR via the endpoint's address of its family
//! (the connection's `dst_ip_addrs`), minus the CIDRs the connection asks
//! to keep away from the proxy, which then follow the client's own routes.
//! "Everything" (`0.0.0.0/0`, `::/0`) is given as its two halves: a pod has
//! a default route of its own (via eth0), which a second default would
//! clash with (EEXIST) or replace, while the longer halves win over it and
//! leave it in place for when the connection goes.

use std::net::IpAddr;

use ipnet::IpNet;
use nsm_api::connectioncontext::{IpContext, Route};

/// `nets` without the addresses in `holes`: the fewest prefixes that cover
/// what is left (at most one per bit of each hole's prefix length).
pub fn subtract(nets: &[IpNet], holes: &[IpNet]) -> Vec<IpNet> {
    let mut out = Vec::new();
    let mut work: Vec<IpNet> = nets.iter().rev().map(IpNet::trunc).collect();
    while let Some(net) = work.pop() {
        if holes.iter().any(|h| h.contains(&net)) {
            continue;
        }
        if !holes.iter().any(|h| net.contains(h)) {
            if !out.contains(&net) {
                out.push(net);
            }
            continue;
        }
        // A hole lies strictly inside: keep the halves apart.
        let halves: Vec<IpNet> = net
            .subnets(net.prefix_len() + 1)
            .expect("a net holding a longer prefix can be split")
            .collect();
        work.extend(halves.into_iter().rev());
    }
    out
}

/// The endpoint's address of each family (without prefix), the next hop
/// for the client.
fn next_hops(ip: &IpContext) -> (Option<IpAddr>, Option<IpAddr>) {
    let addrs = ip
        .dst_ip_addrs
        .iter()
        .filter_map(|a| a.parse::<IpNet>().ok().map(|n| n.addr()));
    let mut v4 = None;
    let mut v6 = None;
    for a in addrs {
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

/// `nets` with every /0 replaced by its two /1 halves (same addresses,
/// never the same prefix as a default route).
fn split_defaults(nets: Vec<IpNet>) -> Vec<IpNet> {
    nets.into_iter()
        .flat_map(|n| {
            if n.prefix_len() == 0 {
                n.subnets(1).expect("a /0 has /1 halves").collect()
            } else {
                vec![n]
            }
        })
        .collect()
}

/// The capture routes for `ip`: `capture` minus `exclude`, each via the
/// endpoint address of its family, a /0 as its two halves; prefixes of a
/// family the connection has no address of are left out.
pub fn capture_routes(ip: &IpContext, capture: &[IpNet], exclude: &[IpNet]) -> Vec<Route> {
    let (v4, v6) = next_hops(ip);
    split_defaults(subtract(capture, exclude))
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
        .collect()
}

/// Replaces the routes via a next hop in `ip.src_routes` with `routes`.
/// Only this function gives the client routes with a next hop (IPAM's
/// point-to-point route is direct), so a refresh, a changed configuration
/// or a switch to placement sidecar (`routes` empty) leaves no stale one.
pub fn set_capture_routes(ip: &mut IpContext, routes: Vec<Route>) {
    ip.src_routes.retain(|r| r.next_hop.is_empty());
    ip.src_routes.extend(routes);
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

    fn ctx(dst: &[&str]) -> IpContext {
        IpContext {
            dst_ip_addrs: dst.iter().map(|s| (*s).to_owned()).collect(),
            src_routes: vec![Route {
                prefix: "198.18.0.1/32".into(),
                next_hop: String::new(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn subtract_splits_around_holes() {
        assert_eq!(
            strs(&subtract(&nets(&["0.0.0.0/0"]), &nets(&["128.0.0.0/2"]))),
            ["0.0.0.0/1", "192.0.0.0/2"]
        );
        let left = subtract(&nets(&["0.0.0.0/0"]), &nets(&["10.0.0.0/8"]));
        assert_eq!(left.len(), 8);
        assert!(
            !left
                .iter()
                .any(|n| n.contains(&"10.1.2.3".parse::<IpAddr>().unwrap()))
        );
        for a in ["9.255.255.255", "11.0.0.0", "198.19.1.1", "255.255.255.255"] {
            let a: IpAddr = a.parse().unwrap();
            assert_eq!(left.iter().filter(|n| n.contains(&a)).count(), 1, "{a}");
        }
        // Holes of the other family, or outside, change nothing; a hole
        // covering everything leaves nothing.
        assert_eq!(
            strs(&subtract(
                &nets(&["198.19.0.0/16"]),
                &nets(&["fd00::/8", "10.0.0.0/8"])
            )),
            ["198.19.0.0/16"]
        );
        assert!(subtract(&nets(&["198.19.0.0/16"]), &nets(&["198.0.0.0/8"])).is_empty());
        assert_eq!(subtract(&nets(&["::/0"]), &nets(&["fd00::/8"])).len(), 8);
    }

    fn pairs(routes: &[Route]) -> Vec<(&str, &str)> {
        routes
            .iter()
            .map(|r| (r.prefix.as_str(), r.next_hop.as_str()))
            .collect()
    }

    #[test]
    fn routes_go_via_the_endpoint_address_of_their_family() {
        let some = nets(&["198.19.0.0/16", "fd00:9::/32"]);
        let r = capture_routes(&ctx(&["198.18.0.0/32"]), &some, &[]);
        assert_eq!(pairs(&r), [("198.19.0.0/16", "198.18.0.0")]);
        let r = capture_routes(&ctx(&["198.18.0.0/32", "fd00::a/128"]), &some, &[]);
        assert_eq!(
            pairs(&r),
            [("198.19.0.0/16", "198.18.0.0"), ("fd00:9::/32", "fd00::a")]
        );
        assert!(has_ipv6(&ctx(&["fd00::a/128"])));
        assert!(!has_ipv6(&ctx(&["198.18.0.0/32"])));
    }

    #[test]
    fn everything_is_two_halves_so_the_clients_default_route_stays() {
        let all = nets(&["0.0.0.0/0", "::/0"]);
        let r = capture_routes(&ctx(&["198.18.0.0/32", "fd00::a/128"]), &all, &[]);
        assert_eq!(
            pairs(&r),
            [
                ("0.0.0.0/1", "198.18.0.0"),
                ("128.0.0.0/1", "198.18.0.0"),
                ("::/1", "fd00::a"),
                ("8000::/1", "fd00::a"),
            ]
        );
        // Together they still cover every address, and no route is a default.
        for a in ["0.0.0.1", "127.255.255.255", "128.0.0.0", "255.255.255.255"] {
            let a: IpAddr = a.parse().unwrap();
            let n = r
                .iter()
                .filter(|x| x.prefix.parse::<IpNet>().unwrap().contains(&a))
                .count();
            assert_eq!(n, 1, "{a}");
        }
        assert!(r.iter().all(|x| !x.prefix.ends_with("/0")));
        // An exclusion already splits the /0; what is left is unchanged.
        let r = capture_routes(&ctx(&["198.18.0.0/32"]), &all, &nets(&["128.0.0.0/2"]));
        assert_eq!(
            pairs(&r),
            [("0.0.0.0/1", "198.18.0.0"), ("192.0.0.0/2", "198.18.0.0")]
        );
    }

    #[test]
    fn set_replaces_only_routes_with_a_next_hop() {
        let mut ip = ctx(&["198.18.0.0/32"]);
        let all = nets(&["0.0.0.0/0"]);
        let routes = capture_routes(&ip, &all, &[]);
        set_capture_routes(&mut ip, routes.clone());
        set_capture_routes(&mut ip, routes);
        // The p2p route and the two halves, however often it is set.
        assert_eq!(ip.src_routes.len(), 3, "idempotent: {:?}", ip.src_routes);
        set_capture_routes(&mut ip, Vec::new());
        assert_eq!(ip.src_routes.len(), 1, "the p2p route stays");
        assert!(ip.src_routes[0].next_hop.is_empty());
    }
}
