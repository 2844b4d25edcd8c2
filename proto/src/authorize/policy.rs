//! Which policies run, chosen as NSM chooses policy files: a comma list of
//! paths or masks (`etc/nsm/opa/common/.*.rego`), here naming our native
//! policies by their file names and groups; empty means none.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Policy {
    TokensValid,
    TokensChained,
    TokensExpired,
    PrevTokenSigned,
    NextTokenSigned,
}

impl Policy {
    pub const ALL: [Policy; 5] = [
        Policy::TokensValid,
        Policy::TokensChained,
        Policy::TokensExpired,
        Policy::PrevTokenSigned,
        Policy::NextTokenSigned,
    ];

    /// NSM's file name (without `.rego`).
    pub fn name(self) -> &'static str {
        match self {
            Policy::TokensValid => "tokens_valid",
            Policy::TokensChained => "tokens_chained",
            Policy::TokensExpired => "tokens_expired",
            Policy::PrevTokenSigned => "prev_token_signed",
            Policy::NextTokenSigned => "next_token_signed",
        }
    }

    /// NSM's directory under `etc/nsm/opa/`.
    pub fn group(self) -> &'static str {
        match self {
            Policy::TokensValid | Policy::TokensChained | Policy::TokensExpired => "common",
            Policy::PrevTokenSigned => "server",
            Policy::NextTokenSigned => "client",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} names no policy we implement: use NSM's paths (etc/nsm/opa/<common|server|client>/.*.rego or …/<name>.rego) or names (tokens_valid, tokens_chained, tokens_expired, prev_token_signed, next_token_signed); custom Rego is not supported"
)]
pub struct PolicyError(pub String);

/// A set of policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Policies(u8);

impl Policies {
    pub const NONE: Policies = Policies(0);

    fn bit(p: Policy) -> u8 {
        1 << (p as u8)
    }

    pub fn of(list: &[Policy]) -> Policies {
        Policies(list.iter().fold(0, |acc, p| acc | Self::bit(*p)))
    }

    pub fn contains(self, p: Policy) -> bool {
        self.0 & Self::bit(p) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Policy> {
        Policy::ALL.into_iter().filter(move |p| self.contains(*p))
    }

    /// A server's default, as sdk's `authorize.NewServer`: common + server.
    pub fn server_default() -> Policies {
        Policies::of(&[
            Policy::TokensValid,
            Policy::TokensChained,
            Policy::TokensExpired,
            Policy::PrevTokenSigned,
        ])
    }

    /// A client's default, as sdk's `authorize.NewClient`: common + client.
    pub fn client_default() -> Policies {
        Policies::of(&[
            Policy::TokensValid,
            Policy::TokensChained,
            Policy::TokensExpired,
            Policy::NextTokenSigned,
        ])
    }

    /// NSM's comma list of policy paths (`etc/nsm/opa/common/.*.rego`,
    /// `etc/nsm/opa/server/prev_token_signed.rego`) or bare names.
    pub fn parse(list: &str) -> Result<Policies, PolicyError> {
        let mut out = Policies::NONE;
        for entry in list.split(',').map(|e| e.trim().trim_matches('"')) {
            if entry.is_empty() {
                continue;
            }
            let (dir, file) = match entry.rsplit_once('/') {
                Some((dir, file)) => (dir.rsplit('/').next().unwrap_or(dir), file),
                None => ("", entry),
            };
            let stem = file.strip_suffix(".rego").unwrap_or(file);
            let picked: Vec<Policy> = if stem == ".*" || stem == "*" {
                Policy::ALL
                    .into_iter()
                    .filter(|p| p.group() == dir)
                    .collect()
            } else {
                Policy::ALL
                    .into_iter()
                    .filter(|p| p.name() == stem && (dir.is_empty() || p.group() == dir))
                    .collect()
            };
            if picked.is_empty() {
                return Err(PolicyError(entry.to_owned()));
            }
            out = Policies(out.0 | Policies::of(&picked).0);
        }
        Ok(out)
    }
}

impl fmt::Display for Policies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<&str> = self.iter().map(Policy::name).collect();
        f.write_str(&names.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nsm_paths_and_masks_name_our_policies() {
        assert_eq!(
            Policies::parse("etc/nsm/opa/common/.*.rego,etc/nsm/opa/server/.*.rego").unwrap(),
            Policies::server_default()
        );
        assert_eq!(
            Policies::parse("etc/nsm/opa/common/.*.rego, etc/nsm/opa/client/.*.rego").unwrap(),
            Policies::client_default()
        );
        assert_eq!(
            Policies::parse("etc/nsm/opa/common/tokens_expired.rego,prev_token_signed").unwrap(),
            Policies::of(&[Policy::TokensExpired, Policy::PrevTokenSigned])
        );
        assert_eq!(Policies::parse("").unwrap(), Policies::NONE);
        assert_eq!(Policies::parse("\"\"").unwrap(), Policies::NONE);
        assert!(Policies::parse("etc/nsm/opa/custom/mine.rego").is_err());
        assert!(Policies::parse("etc/nsm/opa/server/tokens_valid.rego").is_err());
        assert_eq!(
            Policies::server_default().to_string(),
            "tokens_valid,tokens_chained,tokens_expired,prev_token_signed"
        );
    }
}
