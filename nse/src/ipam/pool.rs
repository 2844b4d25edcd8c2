//! The free addresses of one prefix, as disjoint inclusive ranges in a
//! B-tree: taking the lowest free address, a given address, or freeing one
//! costs O(log ranges), whatever the prefix size (a /8 or a /64 is one range
//! until it fragments).

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::addr::{Addr, bounds};
use super::exclude::Excluded;

#[derive(Debug, Clone)]
pub struct Pool {
    prefix: IpNet,
    v6: bool,
    lo: u128,
    hi: u128,
    /// start → end (inclusive); ranges never overlap or touch.
    free: BTreeMap<u128, u128>,
}

impl Pool {
    pub fn new(prefix: IpNet) -> Self {
        let (lo, hi) = bounds(&prefix);
        Pool {
            prefix,
            v6: lo.v6,
            lo: lo.n,
            hi: hi.n,
            free: BTreeMap::from([(lo.n, hi.n)]),
        }
    }

    pub fn prefix(&self) -> &IpNet {
        &self.prefix
    }

    fn addr(&self, n: u128) -> Addr {
        Addr { v6: self.v6, n }
    }

    /// Whether `a` belongs to this prefix (free or not).
    pub fn covers(&self, a: Addr) -> bool {
        a.v6 == self.v6 && (self.lo..=self.hi).contains(&a.n)
    }

    /// The free range holding `n`, if any.
    fn range_of(&self, n: u128) -> Option<(u128, u128)> {
        let (&s, &e) = self.free.range(..=n).next_back()?;
        (n <= e).then_some((s, e))
    }

    pub fn is_free(&self, a: Addr) -> bool {
        self.covers(a) && self.range_of(a.n).is_some()
    }

    /// The lowest free, non-excluded address ≥ `from`.
    fn first_free(&self, from: u128, excluded: &Excluded) -> Option<Addr> {
        let first = self.range_of(from);
        let rest = from
            .checked_add(1)
            .into_iter()
            .flat_map(|f| self.free.range(f..))
            .map(|(&s, &e)| (s, e));
        for (s, e) in first.into_iter().chain(rest) {
            let mut n = s.max(from);
            loop {
                match excluded.covering_end(self.addr(n)) {
                    None => return Some(self.addr(n)),
                    Some(end) if end >= e => break,
                    Some(end) => n = end + 1,
                }
            }
        }
        None
    }

    /// Takes `a` if it is free; false otherwise.
    pub fn take(&mut self, a: Addr) -> bool {
        if !self.covers(a) {
            return false;
        }
        let Some((s, e)) = self.range_of(a.n) else {
            return false;
        };
        self.free.remove(&s);
        if s < a.n {
            self.free.insert(s, a.n - 1);
        }
        if a.n < e {
            self.free.insert(a.n + 1, e);
        }
        true
    }

    /// Takes the two lowest free, non-excluded addresses: (first, second).
    pub fn take_pair(&mut self, excluded: &Excluded) -> Option<(Addr, Addr)> {
        let first = self.first_free(self.lo, excluded)?;
        let second = self.first_free(first.n.checked_add(1)?, excluded)?;
        self.take(first);
        self.take(second);
        Some((first, second))
    }

    /// Gives `a` back; a no-op for addresses outside the prefix or already free.
    pub fn release(&mut self, a: Addr) {
        if !self.covers(a) || self.range_of(a.n).is_some() {
            return;
        }
        let (mut s, mut e) = (a.n, a.n);
        if let Some(left) = a.n.checked_sub(1).and_then(|l| self.range_of(l)) {
            self.free.remove(&left.0);
            s = left.0;
        }
        if let Some(right_end) = a.n.checked_add(1).and_then(|r| self.free.remove(&r)) {
            e = right_end;
        }
        self.free.insert(s, e);
    }

    /// Free addresses left (for diagnostics and tests).
    pub fn free_count(&self) -> u128 {
        self.free.iter().map(|(s, e)| e - s + 1).sum()
    }

    /// Number of free ranges (fragmentation).
    #[cfg(test)]
    pub fn ranges(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn a(s: &str) -> Addr {
        Addr::from(s.parse::<IpAddr>().unwrap())
    }

    fn pool(p: &str) -> Pool {
        Pool::new(p.parse().unwrap())
    }

    fn ex(v: &[&str]) -> Excluded {
        let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        Excluded::parse(&v).unwrap()
    }

    #[test]
    fn slash31_gives_both_addresses_then_nothing() {
        let mut p = pool("198.18.1.100/31");
        let (d, s) = p.take_pair(&Excluded::default()).unwrap();
        assert_eq!((d, s), (a("198.18.1.100"), a("198.18.1.101")));
        assert!(p.take_pair(&Excluded::default()).is_none());
        p.release(d);
        p.release(s);
        assert_eq!(p.free_count(), 2);
        assert_eq!(p.ranges(), 1);
    }

    #[test]
    fn network_address_is_usable() {
        let mut p = pool("198.18.0.0/16");
        let (d, s) = p.take_pair(&Excluded::default()).unwrap();
        assert_eq!((d, s), (a("198.18.0.0"), a("198.18.0.1")));
    }

    #[test]
    fn exclusions_are_skipped() {
        let mut p = pool("198.18.1.100/30");
        let (d, s) = p.take_pair(&ex(&["198.18.1.101/32"])).unwrap();
        assert_eq!((d, s), (a("198.18.1.100"), a("198.18.1.102")));
        // Only .101 (excluded) and .103 are left: no pair under the same exclusion.
        assert!(p.take_pair(&ex(&["198.18.1.101/32"])).is_none());
        assert_eq!(
            p.take_pair(&Excluded::default()),
            Some((a("198.18.1.101"), a("198.18.1.103")))
        );
    }

    #[test]
    fn exclusion_spanning_free_ranges() {
        let mut p = pool("198.18.0.0/24");
        for i in [1, 3, 5] {
            assert!(p.take(a(&format!("198.18.0.{i}"))));
        }
        // Free: .0, .2, .4, .6-.255; exclude .0-.5 → .6 and .7.
        let got = p
            .take_pair(&ex(&["198.18.0.0/30", "198.18.0.4/31"]))
            .unwrap();
        assert_eq!(got, (a("198.18.0.6"), a("198.18.0.7")));
    }

    #[test]
    fn take_and_release_merge_ranges() {
        let mut p = pool("fd00::/120");
        assert!(p.take(a("fd00::10")));
        assert!(!p.take(a("fd00::10")), "taken twice");
        assert!(!p.take(a("fd00::1:0")), "outside the prefix");
        assert!(!p.take(a("198.18.0.1")), "other family");
        assert_eq!(p.ranges(), 2);
        p.release(a("fd00::10"));
        p.release(a("fd00::10")); // double free is a no-op
        assert_eq!((p.ranges(), p.free_count()), (1, 256));
    }

    #[test]
    fn lowest_free_is_reused_first() {
        let mut p = pool("198.18.0.0/24");
        let pairs: Vec<_> = (0..4)
            .map(|_| p.take_pair(&Excluded::default()).unwrap())
            .collect();
        p.release(pairs[1].0);
        p.release(pairs[1].1);
        assert_eq!(p.take_pair(&Excluded::default()), Some(pairs[1]));
    }

    #[test]
    fn huge_prefixes_are_cheap() {
        let mut p = pool("fd00::/64");
        for _ in 0..10_000 {
            p.take_pair(&Excluded::default()).unwrap();
        }
        assert_eq!(p.ranges(), 1);
        assert_eq!(p.free_count(), (1u128 << 64) - 20_000);
    }
}
