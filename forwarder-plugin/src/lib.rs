//! Kernel dataplane for the mesh-proxy NSE: network namespace handles (the only
//! place that calls setns), links over rtnetlink, redirect-rule backends, and a
//! userspace WireGuard tunnel.

pub mod hop;
pub mod link;
pub mod netns;
pub mod proxy;
pub mod rules;
pub mod serve;
pub mod wireguard;
