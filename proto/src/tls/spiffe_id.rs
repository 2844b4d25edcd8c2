//! SPIFFE IDs (`spiffe://<trust domain>/<path>`), as the SPIFFE standard
//! writes them: a lower-case trust domain of letters, digits, `.`, `-`,
//! `_`; a path of `/`-separated segments of letters, digits, `.`, `-`, `_`.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a SPIFFE ID: {why}")]
pub struct SpiffeIdError {
    pub value: String,
    pub why: &'static str,
}

const SCHEME: &str = "spiffe://";
/// The standard's limit for the whole ID.
const MAX_LEN: usize = 2048;

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl SpiffeId {
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path, with its leading `/` (empty for the trust domain's own ID).
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| SpiffeIdError {
            value: s.chars().take(MAX_LEN).collect(),
            why,
        };
        if s.len() > MAX_LEN {
            return Err(bad("longer than 2048 bytes"));
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("no spiffe:// scheme"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.is_empty()
            || !td.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            })
        {
            return Err(bad(
                "the trust domain is empty or has characters other than a-z 0-9 . - _",
            ));
        }
        if !path.is_empty() && !path[1..].split('/').all(segment_ok) {
            return Err(bad(
                "a path segment is empty, . or .., or has characters other than letters, digits, . - _",
            ));
        }
        Ok(SpiffeId {
            trust_domain: td.to_owned(),
            path: path.to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_standards_form() {
        let id: SpiffeId = "spiffe://k8s.nsm/ns/nsm-system/pod/nse-1".parse().unwrap();
        assert_eq!(id.trust_domain(), "k8s.nsm");
        assert_eq!(id.path(), "/ns/nsm-system/pod/nse-1");
        assert_eq!(id.to_string(), "spiffe://k8s.nsm/ns/nsm-system/pod/nse-1");
        for bad in [
            "http://k8s.nsm/x",
            "spiffe://",
            "spiffe://K8S/x",
            "spiffe://td/a//b",
            "spiffe://td/a/../b",
            "spiffe://td/a/",
            "spiffe://td/a b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
