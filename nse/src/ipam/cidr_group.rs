//! `NSM_CIDR_PREFIX` grammar (sdk `tools/cidr` groups): a comma list whose
//! items are a CIDR or a bracketed group of CIDRs, e.g.
//! `[198.18.0.0/24, 198.18.1.0/24], [fd00::/120], 198.18.2.0/24`.
//! Each group is one independent point-to-point IPAM, so `[v4], [v6]` gives
//! every connection one IPv4 and one IPv6 pair. Host bits are cleared, as Go's
//! `net.ParseCIDR` does (`198.18.3.4/16` means `198.18.0.0/16`).

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrGroupError {
    #[error("is empty: give at least one CIDR, e.g. 169.254.0.0/16")]
    Empty,
    #[error("has an empty item at position {0}")]
    EmptyItem(usize),
    #[error("nests '[' inside a group at byte {0}")]
    Nested(usize),
    #[error("has ']' without a matching '[' at byte {0}")]
    Unopened(usize),
    #[error("has a group that is never closed with ']'")]
    Unclosed,
    #[error("expects ',' after ']' at byte {0}")]
    MissingComma(usize),
    #[error("has {0:?}, which is not a CIDR (expected e.g. 198.18.0.0/24 or fd00::/64)")]
    Cidr(String),
}

/// Parses CIDR groups; every group has at least one prefix.
pub fn parse_groups(text: &str) -> Result<Vec<Vec<IpNet>>, CidrGroupError> {
    if text.trim().is_empty() {
        return Err(CidrGroupError::Empty);
    }
    let mut groups: Vec<Vec<IpNet>> = Vec::new();
    let mut current: Option<Vec<IpNet>> = None; // Some while inside '[' … ']'
    let mut token = String::new();
    let mut items = 0usize;
    let mut after_close = false;

    let flush = |token: &mut String,
                 current: &mut Option<Vec<IpNet>>,
                 groups: &mut Vec<Vec<IpNet>>,
                 items: &mut usize|
     -> Result<(), CidrGroupError> {
        *items += 1;
        let t = token.trim();
        if t.is_empty() {
            return Err(CidrGroupError::EmptyItem(*items));
        }
        let net: IpNet = t.parse().map_err(|_| CidrGroupError::Cidr(t.to_owned()))?;
        let net = net.trunc();
        match current {
            Some(g) => g.push(net),
            None => groups.push(vec![net]),
        }
        token.clear();
        Ok(())
    };

    for (at, c) in text.char_indices() {
        match c {
            '[' => {
                if current.is_some() {
                    return Err(CidrGroupError::Nested(at));
                }
                if !token.trim().is_empty() {
                    return Err(CidrGroupError::Cidr(format!("{}[", token.trim())));
                }
                current = Some(Vec::new());
            }
            ']' => {
                if current.is_none() {
                    return Err(CidrGroupError::Unopened(at));
                }
                flush(&mut token, &mut current, &mut groups, &mut items)?;
                groups.extend(current.take());
                after_close = true;
                continue;
            }
            ',' if after_close => {
                after_close = false;
                token.clear();
                continue;
            }
            ',' => flush(&mut token, &mut current, &mut groups, &mut items)?,
            c if after_close => {
                if c.is_whitespace() {
                    continue;
                }
                return Err(CidrGroupError::MissingComma(at));
            }
            c => token.push(c),
        }
        after_close = false;
    }
    if current.is_some() {
        return Err(CidrGroupError::Unclosed);
    }
    if !after_close {
        flush(&mut token, &mut current, &mut groups, &mut items)?;
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn single_and_groups() {
        assert_eq!(
            parse_groups("169.254.0.0/16").unwrap(),
            vec![nets(&["169.254.0.0/16"])]
        );
        assert_eq!(
            parse_groups("[198.18.0.0/24, 198.18.1.0/24], [fd00::/120], 198.18.2.0/24").unwrap(),
            vec![
                nets(&["198.18.0.0/24", "198.18.1.0/24"]),
                nets(&["fd00::/120"]),
                nets(&["198.18.2.0/24"]),
            ]
        );
        // Plain comma list = one group per CIDR (as the sdk decodes it).
        assert_eq!(
            parse_groups("198.18.0.0/31,fd00::/127").unwrap(),
            vec![nets(&["198.18.0.0/31"]), nets(&["fd00::/127"])]
        );
    }

    #[test]
    fn host_bits_are_cleared() {
        assert_eq!(
            parse_groups("198.18.3.4/16").unwrap(),
            vec![nets(&["198.18.0.0/16"])]
        );
        assert_eq!(
            parse_groups("198.18.1.101/31").unwrap(),
            vec![nets(&["198.18.1.100/31"])]
        );
    }

    #[test]
    fn malformed() {
        let cases = [
            ("", CidrGroupError::Empty),
            ("  ", CidrGroupError::Empty),
            ("198.18.0.0/24,", CidrGroupError::EmptyItem(2)),
            (",198.18.0.0/24", CidrGroupError::EmptyItem(1)),
            ("[198.18.0.0/24, [fd00::/64]]", CidrGroupError::Nested(16)),
            ("198.18.0.0/24]", CidrGroupError::Unopened(13)),
            ("[198.18.0.0/24", CidrGroupError::Unclosed),
            ("[198.18.0.0/24] x", CidrGroupError::MissingComma(16)),
            ("198.18.0.0", CidrGroupError::Cidr("198.18.0.0".into())),
            (
                "198.18.0.0/33",
                CidrGroupError::Cidr("198.18.0.0/33".into()),
            ),
            ("[]", CidrGroupError::EmptyItem(1)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_groups(text), Err(want), "{text:?}");
        }
    }
}
