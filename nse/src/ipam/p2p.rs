//! Point-to-point IPAM over CIDR groups (sdk `point2pointipam` chained by
//! `groupipam`, with `strictipam` as [`Policy::Strict`]).
//!
//! Per connection and per group: two host addresses from the first prefix of
//! the group that has them, honouring `excluded_prefixes`; the first is the
//! endpoint side (`dst`), the second the client side (`src`). A connection we
//! do not know (heal, our restart) first gets back the addresses it presents,
//! if they are free. Allocation is two-phase so a failing chain leaves
//! nothing behind: [`P2pIpam::prepare`] takes addresses, [`P2pIpam::commit`]
//! makes them the connection's, [`P2pIpam::rollback`] gives them back.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use ipnet::IpNet;
use nsm_api::connectioncontext::{IpContext, Route};

use super::addr::{Addr, parse_cidr_addr};
use super::exclude::Excluded;
use super::pool::Pool;
use super::{IpamError, Policy};

/// One connection's pair in one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pair {
    pool: usize,
    dst: Addr,
    src: Addr,
}

struct State {
    groups: Vec<Vec<Pool>>,
    /// Connection id (the endpoint's path segment id) → its pair per group.
    conns: HashMap<String, Vec<Pair>>,
}

pub struct P2pIpam {
    policy: Policy,
    state: Mutex<State>,
}

/// Addresses a Request has taken but not yet committed.
#[must_use = "commit or roll back, or the addresses stay taken"]
#[derive(Debug)]
pub struct Pending {
    id: String,
    pairs: Vec<Pair>,
    /// Newly taken pairs (given back on rollback).
    taken: Vec<(usize, Pair)>,
    /// Pairs of this connection that became excluded (given back on commit).
    replaced: Vec<(usize, Pair)>,
}

impl Pending {
    /// Whether this Request took new addresses (a new connection, a recovery or a re-allocation).
    pub fn took_addresses(&self) -> bool {
        !self.taken.is_empty()
    }
}

impl P2pIpam {
    pub fn new(groups: &[Vec<IpNet>], policy: Policy) -> Self {
        let groups = groups
            .iter()
            .map(|g| g.iter().map(|p| Pool::new(*p)).collect())
            .collect();
        P2pIpam {
            policy,
            state: Mutex::new(State {
                groups,
                conns: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the maps consistent before it can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fills `ip` with this connection's addresses and routes, taking new ones as needed.
    /// On error nothing is taken and `ip` may have been partly edited (the caller drops it).
    pub fn prepare(&self, id: &str, ip: &mut IpContext) -> Result<Pending, IpamError> {
        let excluded =
            Excluded::parse(&ip.excluded_prefixes).map_err(|bad| IpamError::Malformed {
                field: "excluded_prefixes",
                value: bad.clone(),
            })?;
        let mut src = parse_all(&ip.src_ip_addrs, "src_ip_addrs")?;
        let mut dst = parse_all(&ip.dst_ip_addrs, "dst_ip_addrs")?;

        let mut state = self.lock();
        let stored = state.conns.get(id).cloned();
        if self.policy == Policy::Strict {
            let available = |a: Addr| {
                stored.iter().flatten().any(|p| p.src == a || p.dst == a)
                    || state.groups.iter().flatten().any(|pool| pool.is_free(a))
            };
            src.retain(|(text, a)| {
                let keep = available(*a);
                if !keep {
                    delete_addr(&mut ip.src_ip_addrs, text);
                    delete_route(&mut ip.dst_routes, text);
                }
                keep
            });
            dst.retain(|(text, a)| {
                let keep = available(*a);
                if !keep {
                    delete_addr(&mut ip.dst_ip_addrs, text);
                    delete_route(&mut ip.src_routes, text);
                }
                keep
            });
        }

        let mut pending = Pending {
            id: id.to_owned(),
            pairs: Vec::with_capacity(state.groups.len()),
            taken: Vec::new(),
            replaced: Vec::new(),
        };
        for g in 0..state.groups.len() {
            let kept = stored.as_ref().and_then(|s| s.get(g).copied());
            let pair = match kept {
                Some(p) if !excluded.contains(p.src) && !excluded.contains(p.dst) => p,
                previous => {
                    if let Some(old) = previous {
                        // Our addresses became excluded: drop them and pick new ones.
                        remove_pair(ip, &old);
                        pending.replaced.push((g, old));
                    }
                    let group = &mut state.groups[g];
                    let got = recover(group, &src, &dst, &excluded)
                        .or_else(|| allocate(group, &excluded));
                    match got {
                        Some(p) => {
                            pending.taken.push((g, p));
                            p
                        }
                        None => {
                            let prefixes: Vec<String> =
                                group.iter().map(|p| p.prefix().to_string()).collect();
                            give_back(&mut state.groups, &pending.taken);
                            return Err(IpamError::Exhausted {
                                prefixes: prefixes.join(", "),
                            });
                        }
                    }
                }
            };
            add_pair(ip, &pair);
            pending.pairs.push(pair);
        }
        own_side(id, ip, &pending.pairs);
        Ok(pending)
    }

    /// The Request succeeded: the addresses are this connection's until [`P2pIpam::release`].
    pub fn commit(&self, pending: Pending) {
        let mut state = self.lock();
        give_back(&mut state.groups, &pending.replaced);
        state.conns.insert(pending.id, pending.pairs);
    }

    /// The Request failed: give back what [`P2pIpam::prepare`] took.
    pub fn rollback(&self, pending: Pending) {
        let mut state = self.lock();
        give_back(&mut state.groups, &pending.taken);
    }

    /// Close: frees the connection's addresses (a no-op for unknown ids).
    pub fn release(&self, id: &str) {
        let mut state = self.lock();
        if let Some(pairs) = state.conns.remove(id) {
            let pairs: Vec<_> = pairs.into_iter().enumerate().collect();
            give_back(&mut state.groups, &pairs);
        }
    }

    /// Number of connections holding addresses.
    pub fn connections(&self) -> usize {
        self.lock().conns.len()
    }

    /// Free addresses left per group (for diagnostics and tests).
    pub fn free_per_group(&self) -> Vec<u128> {
        self.lock()
            .groups
            .iter()
            .map(|g| g.iter().map(Pool::free_count).sum())
            .collect()
    }
}

fn parse_all(list: &[String], field: &'static str) -> Result<Vec<(String, Addr)>, IpamError> {
    list.iter()
        .map(|s| {
            parse_cidr_addr(s)
                .map(|a| (s.clone(), a))
                .ok_or_else(|| IpamError::Malformed {
                    field,
                    value: s.clone(),
                })
        })
        .collect()
}

/// The first presented src and dst addresses that one pool of the group still has free.
fn recover(
    group: &mut [Pool],
    src: &[(String, Addr)],
    dst: &[(String, Addr)],
    excluded: &Excluded,
) -> Option<Pair> {
    for (i, pool) in group.iter_mut().enumerate() {
        let usable = |a: &Addr| pool.is_free(*a) && !excluded.contains(*a);
        let Some(s) = src.iter().map(|(_, a)| *a).find(usable) else {
            continue;
        };
        let Some(d) = dst.iter().map(|(_, a)| *a).find(|a| *a != s && usable(a)) else {
            continue;
        };
        pool.take(s);
        pool.take(d);
        return Some(Pair {
            pool: i,
            dst: d,
            src: s,
        });
    }
    None
}

fn allocate(group: &mut [Pool], excluded: &Excluded) -> Option<Pair> {
    group.iter_mut().enumerate().find_map(|(i, pool)| {
        pool.take_pair(excluded)
            .map(|(dst, src)| Pair { pool: i, dst, src })
    })
}

fn give_back(groups: &mut [Vec<Pool>], pairs: &[(usize, Pair)]) {
    for (g, p) in pairs {
        let pool = &mut groups[*g][p.pool];
        pool.release(p.src);
        pool.release(p.dst);
    }
}

/// The endpoint's side lands in the endpoint's own namespace, which all its
/// connections share: its addresses and routes are the pairs' alone, never
/// what a client put there (a client's `dst_routes` would take every other
/// client's traffic through its interface). The client's side may keep what
/// the client asked for: it only touches the client.
fn own_side(id: &str, ip: &mut IpContext, pairs: &[Pair]) {
    let addrs: Vec<String> = pairs.iter().map(|p| p.dst.host_prefix()).collect();
    let routes: Vec<Route> = pairs
        .iter()
        .map(|p| Route {
            prefix: p.src.host_prefix(),
            next_hop: String::new(),
        })
        .collect();
    if ip.dst_ip_addrs != addrs || ip.dst_routes != routes {
        tracing::debug!(
            id = ?id,
            dst_ip_addrs = ?ip.dst_ip_addrs,
            dst_routes = ?ip.dst_routes.iter().map(|r| (&r.prefix, &r.next_hop)).collect::<Vec<_>>(),
            "dropping what the request put on the endpoint's side"
        );
    }
    ip.dst_ip_addrs = addrs;
    ip.dst_routes = routes;
}

fn add_pair(ip: &mut IpContext, p: &Pair) {
    let (src, dst) = (p.src.host_prefix(), p.dst.host_prefix());
    add_addr(&mut ip.src_ip_addrs, &src);
    add_route(&mut ip.src_routes, &dst);
    add_addr(&mut ip.dst_ip_addrs, &dst);
    add_route(&mut ip.dst_routes, &src);
}

fn remove_pair(ip: &mut IpContext, p: &Pair) {
    let (src, dst) = (p.src.host_prefix(), p.dst.host_prefix());
    delete_addr(&mut ip.src_ip_addrs, &src);
    delete_addr(&mut ip.dst_ip_addrs, &dst);
    delete_route(&mut ip.src_routes, &dst);
    delete_route(&mut ip.dst_routes, &src);
}

fn add_addr(list: &mut Vec<String>, addr: &str) {
    if !list.iter().any(|a| a == addr) {
        list.push(addr.to_owned());
    }
}

fn delete_addr(list: &mut Vec<String>, addr: &str) {
    if let Some(i) = list.iter().position(|a| a == addr) {
        list.remove(i);
    }
}

fn add_route(routes: &mut Vec<Route>, prefix: &str) {
    if !routes.iter().any(|r| r.prefix == prefix) {
        routes.push(Route {
            prefix: prefix.to_owned(),
            ..Default::default()
        });
    }
}

fn delete_route(routes: &mut Vec<Route>, prefix: &str) {
    if let Some(i) = routes.iter().position(|r| r.prefix == prefix) {
        routes.remove(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam(groups: &str, policy: Policy) -> P2pIpam {
        P2pIpam::new(&super::super::parse_groups(groups).unwrap(), policy)
    }

    fn request(ipam: &P2pIpam, id: &str, ip: &mut IpContext) -> Result<(), IpamError> {
        let p = ipam.prepare(id, ip)?;
        ipam.commit(p);
        Ok(())
    }

    fn routes(r: &[Route]) -> Vec<&str> {
        r.iter().map(|r| r.prefix.as_str()).collect()
    }

    #[test]
    fn slash31_dst_first_then_src_with_routes() {
        let ipam = ipam("198.18.1.100/31", Policy::Polite);
        let mut ip = IpContext::default();
        request(&ipam, "a", &mut ip).unwrap();
        assert_eq!(ip.dst_ip_addrs, ["198.18.1.100/32"]);
        assert_eq!(ip.src_ip_addrs, ["198.18.1.101/32"]);
        assert_eq!(routes(&ip.src_routes), ["198.18.1.100/32"]);
        assert_eq!(routes(&ip.dst_routes), ["198.18.1.101/32"]);

        let err = ipam.prepare("b", &mut IpContext::default()).unwrap_err();
        assert!(matches!(err, IpamError::Exhausted { .. }), "{err}");
        assert!(err.to_string().contains("198.18.1.100/31"), "{err}");

        ipam.release("a");
        let mut ip = IpContext::default();
        request(&ipam, "b", &mut ip).unwrap();
        assert_eq!(ip.dst_ip_addrs, ["198.18.1.100/32"]);
    }

    #[test]
    fn refresh_keeps_addresses_without_duplicates() {
        let ipam = ipam("198.18.0.0/24", Policy::Polite);
        let mut ip = IpContext::default();
        request(&ipam, "a", &mut ip).unwrap();
        let first = ip.clone();
        request(&ipam, "a", &mut ip).unwrap();
        assert_eq!(ip, first);
        // Even if the client drops them, a refresh puts the same ones back.
        let mut empty = IpContext::default();
        request(&ipam, "a", &mut empty).unwrap();
        assert_eq!(empty, first);
        assert_eq!(ipam.free_per_group(), [254]);
    }

    #[test]
    fn excluded_prefixes_and_reallocation() {
        let ipam = ipam("198.18.1.100/30", Policy::Polite);
        let mut ip = IpContext {
            excluded_prefixes: vec!["198.18.1.101/32".into()],
            ..Default::default()
        };
        request(&ipam, "a", &mut ip).unwrap();
        assert_eq!(ip.dst_ip_addrs, ["198.18.1.100/32"]);
        assert_eq!(ip.src_ip_addrs, ["198.18.1.102/32"]);

        // Our src became excluded on refresh: old pair dropped, a new one chosen.
        ip.excluded_prefixes = vec!["198.18.1.102/32".into()];
        request(&ipam, "a", &mut ip).unwrap();
        assert_eq!(ip.dst_ip_addrs, ["198.18.1.101/32"]);
        assert_eq!(ip.src_ip_addrs, ["198.18.1.103/32"]);
        assert_eq!(routes(&ip.src_routes), ["198.18.1.101/32"]);
        assert_eq!(routes(&ip.dst_routes), ["198.18.1.103/32"]);
        assert_eq!(ipam.free_per_group(), [2]);
    }

    #[test]
    fn dual_stack_groups() {
        let ipam = ipam("[198.18.0.0/31], [fd00::/127]", Policy::Polite);
        let mut ip = IpContext::default();
        request(&ipam, "a", &mut ip).unwrap();
        assert_eq!(ip.dst_ip_addrs, ["198.18.0.0/32", "fd00::/128"]);
        assert_eq!(ip.src_ip_addrs, ["198.18.0.1/32", "fd00::1/128"]);
    }

    #[test]
    fn exhausting_a_later_group_gives_back_the_earlier_one() {
        let ipam = ipam("[198.18.0.0/24], [fd00::/127]", Policy::Polite);
        request(&ipam, "a", &mut IpContext::default()).unwrap();
        let err = ipam.prepare("b", &mut IpContext::default()).unwrap_err();
        assert!(err.to_string().contains("fd00::/127"), "{err}");
        assert_eq!(ipam.free_per_group(), [254, 0]);
    }

    #[test]
    fn group_falls_through_to_its_next_prefix() {
        let ipam = ipam("[198.18.0.0/31, 198.18.2.0/31]", Policy::Polite);
        request(&ipam, "a", &mut IpContext::default()).unwrap();
        let mut ip = IpContext::default();
        request(&ipam, "b", &mut ip).unwrap();
        assert_eq!(ip.dst_ip_addrs, ["198.18.2.0/32"]);
    }

    #[test]
    fn rollback_gives_back_and_forgets() {
        let ipam = ipam("198.18.0.0/31", Policy::Polite);
        let p = ipam.prepare("a", &mut IpContext::default()).unwrap();
        assert!(p.took_addresses());
        ipam.rollback(p);
        assert_eq!((ipam.connections(), ipam.free_per_group()[0]), (0, 2));
    }

    fn presented(src: &str, dst: &str) -> IpContext {
        IpContext {
            src_ip_addrs: vec![src.into()],
            dst_ip_addrs: vec![dst.into()],
            src_routes: vec![Route {
                prefix: dst.into(),
                ..Default::default()
            }],
            dst_routes: vec![Route {
                prefix: src.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn unknown_connection_recovers_presented_addresses() {
        for policy in [Policy::Polite, Policy::Strict] {
            let ipam = ipam("198.18.0.0/24", policy);
            let mut ip = presented("198.18.0.7/32", "198.18.0.6/32");
            request(&ipam, "a", &mut ip).unwrap();
            assert_eq!(ip.src_ip_addrs, ["198.18.0.7/32"], "{policy:?}");
            assert_eq!(ip.dst_ip_addrs, ["198.18.0.6/32"], "{policy:?}");
            assert_eq!(ipam.free_per_group(), [254]);
        }
    }

    #[test]
    fn foreign_addresses_polite_keeps_strict_drops() {
        let foreign = || presented("198.19.0.1/32", "198.19.0.0/32");
        let polite = ipam("198.18.0.0/24", Policy::Polite);
        let mut ip = foreign();
        request(&polite, "a", &mut ip).unwrap();
        // Polite keeps the client's side; the endpoint's side is ours alone.
        assert_eq!(ip.src_ip_addrs, ["198.19.0.1/32", "198.18.0.1/32"]);
        assert_eq!(ip.dst_ip_addrs, ["198.18.0.0/32"]);
        assert_eq!(routes(&ip.dst_routes), ["198.18.0.1/32"]);

        let strict = ipam("198.18.0.0/24", Policy::Strict);
        let mut ip = foreign();
        request(&strict, "a", &mut ip).unwrap();
        assert_eq!(ip.src_ip_addrs, ["198.18.0.1/32"]);
        assert_eq!(ip.dst_ip_addrs, ["198.18.0.0/32"]);
        assert_eq!(routes(&ip.src_routes), ["198.18.0.0/32"]);
        assert_eq!(routes(&ip.dst_routes), ["198.18.0.1/32"]);
    }

    /// A client cannot route anything through the endpoint's namespace: its
    /// `dst_routes` (here both halves of everything) and extra `dst_ip_addrs`
    /// are dropped under either policy.
    #[test]
    fn the_endpoints_side_is_never_the_clients_to_choose() {
        for policy in [Policy::Polite, Policy::Strict] {
            let ipam = ipam("198.18.0.0/24", policy);
            let mut ip = IpContext {
                dst_ip_addrs: vec!["10.9.9.9/32".into()],
                dst_routes: ["0.0.0.0/1", "128.0.0.0/1"]
                    .map(|p| Route {
                        prefix: p.into(),
                        next_hop: "198.18.0.1".into(),
                    })
                    .to_vec(),
                src_routes: vec![Route {
                    prefix: "198.19.0.0/16".into(),
                    next_hop: String::new(),
                }],
                ..Default::default()
            };
            request(&ipam, "a", &mut ip).unwrap();
            assert_eq!(ip.dst_ip_addrs, ["198.18.0.0/32"], "{policy:?}");
            assert_eq!(routes(&ip.dst_routes), ["198.18.0.1/32"], "{policy:?}");
            assert!(ip.dst_routes.iter().all(|r| r.next_hop.is_empty()));
            // The client's own side keeps what it asked for.
            assert!(routes(&ip.src_routes).contains(&"198.19.0.0/16"));
        }
    }

    #[test]
    fn strict_drops_addresses_of_another_connection() {
        let strict = ipam("198.18.0.0/24", Policy::Strict);
        let mut a = IpContext::default();
        request(&strict, "a", &mut a).unwrap();
        // "b" claims a's addresses (stale context after a heal).
        let mut b = presented(&a.src_ip_addrs[0], &a.dst_ip_addrs[0]);
        request(&strict, "b", &mut b).unwrap();
        assert_eq!(b.src_ip_addrs, ["198.18.0.3/32"]);
        assert_eq!(b.dst_ip_addrs, ["198.18.0.2/32"]);
    }

    #[test]
    fn malformed_input_takes_nothing() {
        let ipam = ipam("198.18.0.0/24", Policy::Polite);
        for ip in [
            IpContext {
                excluded_prefixes: vec!["198.18.0.0/33".into()],
                ..Default::default()
            },
            IpContext {
                src_ip_addrs: vec!["not-an-ip".into()],
                ..Default::default()
            },
            IpContext {
                dst_ip_addrs: vec!["198.18.0.1".into()],
                ..Default::default()
            },
        ] {
            let err = ipam.prepare("a", &mut ip.clone()).unwrap_err();
            assert!(matches!(err, IpamError::Malformed { .. }), "{err}");
        }
        assert_eq!((ipam.connections(), ipam.free_per_group()[0]), (0, 256));
    }
}
