//! mesh-proxy-nse: a Network Service Mesh endpoint with NSM's own semantics.
//!
//! The endpoint is a chain of small elements, in NSM's order (sdk
//! `chains/endpoint`): [`chain::updatepath`] → [`chain::begin`] →
//! [`chain::updatetoken`] → [`chain::timeout`] → [`chain::monitor`] →
//! [`chain::trimpath`] → [`chain::mechanism`] (KERNEL, netns fd over grpcfd) →
//! [`chain::ipam`] (point-to-point) → [`chain::functions`] (network functions,
//! the slot the mesh-proxy function plugs into). [`server`] puts it on gRPC.

#![forbid(unsafe_code)]

pub mod chain;
pub mod config;
pub mod duration;
pub mod endpoint;
pub mod error;
pub mod ipam;
pub mod mechanism;
pub mod metadata;
pub mod monitor;
pub mod netns;
pub mod server;
pub mod token;
pub mod validate;

pub use config::Config;
pub use endpoint::Endpoint;
pub use error::NseError;
