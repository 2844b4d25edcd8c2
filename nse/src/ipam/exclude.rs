//! `ip_context.excluded_prefixes` as merged, sorted ranges: the addresses a
//! request must not be given.

use ipnet::IpNet;

use super::addr::{Addr, bounds};

/// Excluded ranges per family, sorted and merged (no two overlap or touch).
#[derive(Debug, Default, Clone)]
pub struct Excluded {
    v4: Vec<(u128, u128)>,
    v6: Vec<(u128, u128)>,
}

impl Excluded {
    /// Parses the request's excluded prefixes; the first malformed one is returned as the error.
    pub fn parse<'a>(prefixes: impl IntoIterator<Item = &'a String>) -> Result<Self, &'a String> {
        let mut ex = Excluded::default();
        for p in prefixes {
            let net: IpNet = p.trim().parse().map_err(|_| p)?;
            let (lo, hi) = bounds(&net.trunc());
            let list = if lo.v6 { &mut ex.v6 } else { &mut ex.v4 };
            list.push((lo.n, hi.n));
        }
        merge(&mut ex.v4);
        merge(&mut ex.v6);
        Ok(ex)
    }

    fn list(&self, v6: bool) -> &[(u128, u128)] {
        if v6 { &self.v6 } else { &self.v4 }
    }

    /// If `a` is excluded, the last address of the excluded range holding it.
    pub fn covering_end(&self, a: Addr) -> Option<u128> {
        let list = self.list(a.v6);
        let i = list.partition_point(|&(lo, _)| lo <= a.n);
        let &(_, hi) = list.get(i.checked_sub(1)?)?;
        (a.n <= hi).then_some(hi)
    }

    pub fn contains(&self, a: Addr) -> bool {
        self.covering_end(a).is_some()
    }
}

fn merge(list: &mut Vec<(u128, u128)>) {
    list.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(list.len());
    for &(lo, hi) in list.iter() {
        match out.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    *list = out;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn a(s: &str) -> Addr {
        Addr::from(s.parse::<IpAddr>().unwrap())
    }

    #[test]
    fn merges_and_looks_up() {
        let ps: Vec<String> = [
            "198.18.0.4/31",
            "198.18.0.6/31",
            "198.18.0.0/32",
            "fd00::/127",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let ex = Excluded::parse(&ps).unwrap();
        assert_eq!(ex.v4.len(), 2, "{:?}", ex.v4);
        assert!(ex.contains(a("198.18.0.0")));
        assert!(!ex.contains(a("198.18.0.1")));
        assert_eq!(ex.covering_end(a("198.18.0.5")), Some(a("198.18.0.7").n));
        assert!(ex.contains(a("fd00::1")));
        assert!(!ex.contains(a("fd00::2")));
        // Families do not mix: ::c612:4 is not 198.18.0.4.
        assert!(!ex.contains(a("::c612:4")));
    }

    #[test]
    fn malformed_is_reported() {
        let ps = vec!["198.18.0.0/24".to_string(), "nonsense".to_string()];
        assert_eq!(Excluded::parse(&ps).unwrap_err(), "nonsense");
    }
}
