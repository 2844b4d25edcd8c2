//! NSM's default authorization policies, natively (no Rego engine): the
//! checks sdk's `authorize` elements run over a connection's path with the
//! peer's certificate, by the names and groups of NSM's policy files
//! (`etc/nsm/opa/{common,server,client}/*.rego`):
//!
//! | policy | group | holds when |
//! |---|---|---|
//! | `tokens_valid` | common | every segment's token is a JWT |
//! | `tokens_chained` | common | for consecutive segments, `aud(k)` ∋ `sub(k+1)` |
//! | `tokens_expired` | common | every token's `exp` is in the future |
//! | `prev_token_signed` | server | the previous segment's token verifies (ES256) with the caller's certificate |
//! | `next_token_signed` | client | the next segment's token verifies with the server's certificate |
//!
//! A server checks the path up to its own segment (the "left side"), a
//! client the whole returned path. Only SPIFFE peers are checked: without
//! TLS there is no certificate to check against.

mod jwt;
mod policy;

pub use jwt::{Claims, JwtError, decode, verify_es256};
pub use policy::{Policies, Policy, PolicyError};

/// The policies a server runs on every Request and Close.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerPolicyArgs {
    /// NSM's authorization policies for callers, as NSM names policy files: etc/nsm/opa/<common|server>/.*.rego, …/<name>.rego or a bare name (tokens_valid, tokens_chained, tokens_expired, prev_token_signed); empty: none. Applied to SPIFFE callers (not with NSM_INSECURE=true).
    #[arg(
        long,
        env = "NSM_SERVER_POLICIES",
        value_name = "LIST",
        default_value = DEFAULT_SERVER_POLICIES
    )]
    pub server_policies: String,
}

/// The policies a client runs on the path a server returns.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientPolicyArgs {
    /// NSM's authorization policies for the path the manager returns, as NSM names policy files: etc/nsm/opa/<common|client>/.*.rego, …/<name>.rego or a bare name (tokens_valid, tokens_chained, tokens_expired, next_token_signed); empty: none. Checked under TLS only; a path that fails is Closed.
    #[arg(
        long,
        env = "NSM_CLIENT_POLICIES",
        value_name = "LIST",
        default_value = DEFAULT_CLIENT_POLICIES
    )]
    pub client_policies: String,
}

/// sdk `authorize.NewClient`'s default: common + client.
pub const DEFAULT_CLIENT_POLICIES: &str = "etc/nsm/opa/common/.*.rego,etc/nsm/opa/client/.*.rego";

impl ClientPolicyArgs {
    pub fn policies(&self) -> Result<Policies, PolicyError> {
        Policies::parse(&self.client_policies)
    }
}

/// sdk `authorize.NewServer`'s default: common + server.
pub const DEFAULT_SERVER_POLICIES: &str = "etc/nsm/opa/common/.*.rego,etc/nsm/opa/server/.*.rego";

impl ServerPolicyArgs {
    pub fn policies(&self) -> Result<Policies, PolicyError> {
        Policies::parse(&self.server_policies)
    }
}

use std::time::{SystemTime, UNIX_EPOCH};

use crate::connection::{Path, PathSegment};
use crate::tls::PeerSvid;

/// Why a policy denied a path: NSM's policy name and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy {policy} denied: {why}")]
pub struct Denied {
    pub policy: Policy,
    pub why: String,
}

fn deny(policy: Policy, why: impl Into<String>) -> Denied {
    Denied {
        policy,
        why: why.into(),
    }
}

/// A server's check (sdk `authorize.NewServer`): `callers` is the path up
/// to the caller's segment, whose token is the one the caller sent with
/// this call; `me` is our SPIFFE ID (the next in the chain); `peer` the
/// caller's verified certificate.
pub fn check_server(
    policies: &Policies,
    callers: &[PathSegment],
    me: &str,
    peer: &PeerSvid,
    now: SystemTime,
) -> Result<(), Denied> {
    common(policies, callers, Some(me), now)?;
    if policies.contains(Policy::PrevTokenSigned) {
        signed(Policy::PrevTokenSigned, callers.last(), "previous", peer)?;
    }
    Ok(())
}

/// A client's check (sdk `authorize.NewClient`) of the path a server
/// returned: all of it, and the server's segment (`index + 1`) signed by
/// the server's certificate.
pub fn check_client(
    policies: &Policies,
    path: &Path,
    peer: &PeerSvid,
    now: SystemTime,
) -> Result<(), Denied> {
    common(policies, &path.path_segments, None, now)?;
    if policies.contains(Policy::NextTokenSigned) {
        let next = path.path_segments.get(path.index as usize + 1);
        signed(Policy::NextTokenSigned, next, "next", peer)?;
    }
    Ok(())
}

/// tokens_valid, tokens_chained (through `then`, who signs after the last
/// segment), tokens_expired.
fn common(
    policies: &Policies,
    segments: &[PathSegment],
    then: Option<&str>,
    now: SystemTime,
) -> Result<(), Denied> {
    let mut claims = Vec::with_capacity(segments.len());
    for (i, seg) in segments.iter().enumerate() {
        match decode(&seg.token) {
            Ok(c) => claims.push(Some(c)),
            Err(e) if policies.contains(Policy::TokensValid) => {
                return Err(deny(
                    Policy::TokensValid,
                    format!("segment {i} ({}): {e}", seg.name),
                ));
            }
            Err(_) => claims.push(None),
        }
    }
    if policies.contains(Policy::TokensChained) {
        let subs: Vec<Option<&str>> = claims
            .iter()
            .map(|c| c.as_ref().map(|c| c.sub.as_str()))
            .skip(1)
            .chain(then.map(Some))
            .collect();
        for (k, (a, b)) in claims.iter().zip(subs).enumerate() {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(deny(
                    Policy::TokensChained,
                    format!("segment {k} or the next has no readable token"),
                ));
            };
            if !a.aud.iter().any(|aud| aud == b) {
                return Err(deny(
                    Policy::TokensChained,
                    format!(
                        "segment {k}'s token (sub {}) is for {:?}, not for {b}, the next hop",
                        a.sub, a.aud
                    ),
                ));
            }
        }
    }
    if policies.contains(Policy::TokensExpired) {
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        for (i, c) in claims.iter().enumerate() {
            match c {
                Some(c) if c.exp > now => {}
                Some(c) => {
                    return Err(deny(
                        Policy::TokensExpired,
                        format!(
                            "segment {i}'s token (sub {}) expired {} s ago",
                            c.sub,
                            now - c.exp
                        ),
                    ));
                }
                None => {
                    return Err(deny(
                        Policy::TokensExpired,
                        format!("segment {i} has no readable token"),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn signed(
    policy: Policy,
    seg: Option<&PathSegment>,
    whose: &str,
    peer: &PeerSvid,
) -> Result<(), Denied> {
    let Some(seg) = seg else {
        return Err(deny(policy, format!("there is no {whose} segment")));
    };
    verify_es256(&seg.token, &peer.leaf).map_err(|e| {
        deny(
            policy,
            format!("the {whose} segment ({}): {e} (peer {})", seg.name, peer.id),
        )
    })
}

/// The SPIFFE IDs that signed a path's segments (unverified: for scoping
/// what a peer may see of connections already accepted).
pub fn signers(path: &Path) -> impl Iterator<Item = String> + '_ {
    path.path_segments
        .iter()
        .filter_map(|s| decode(&s.token).ok().map(|c| c.sub))
}
