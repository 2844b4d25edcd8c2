//! `inode://<dev>/<ino>` URLs, by which NSM names a file (a netns, a socket)
//! whose descriptor travels beside the gRPC message (grpcfd).

use std::fmt;
use std::str::FromStr;

/// Identity of a file as NSM puts it on the wire: `st_dev` and `st_ino`, both decimal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InodeUrl {
    pub dev: u64,
    pub ino: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InodeUrlError {
    #[error("{0:?} is not an inode URL: expected inode://<dev>/<ino>")]
    Scheme(String),
    #[error("{0:?} is not an inode URL: <dev> and <ino> must be decimal integers")]
    Number(String),
}

impl InodeUrl {
    pub const SCHEME: &'static str = "inode://";

    pub fn new(dev: u64, ino: u64) -> Self {
        Self { dev, ino }
    }
}

impl fmt::Display for InodeUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "inode://{}/{}", self.dev, self.ino)
    }
}

impl FromStr for InodeUrl {
    type Err = InodeUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(Self::SCHEME)
            .ok_or_else(|| InodeUrlError::Scheme(s.to_owned()))?;
        let (dev, ino) = rest
            .split_once('/')
            .ok_or_else(|| InodeUrlError::Scheme(s.to_owned()))?;
        let num = |v: &str| {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(InodeUrlError::Number(s.to_owned()));
            }
            v.parse::<u64>()
                .map_err(|_| InodeUrlError::Number(s.to_owned()))
        };
        Ok(Self {
            dev: num(dev)?,
            ino: num(ino)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let u: InodeUrl = "inode://4/4026534295".parse().unwrap();
        assert_eq!(u, InodeUrl::new(4, 4026534295));
        assert_eq!(u.to_string(), "inode://4/4026534295");
    }

    #[test]
    fn rejects_other_forms() {
        for bad in [
            "file:///proc/1/ns/net",
            "inode://4",
            "inode://4/",
            "inode:///5",
            "inode://a/5",
            "inode://4/5/6",
            "inode://-4/5",
            "inode://4/99999999999999999999999",
        ] {
            assert!(bad.parse::<InodeUrl>().is_err(), "{bad} accepted");
        }
    }
}
