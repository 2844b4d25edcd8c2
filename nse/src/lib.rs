//! mesh-proxy-nse: a Network Service Mesh endpoint with NSM's own semantics.
//!
//! The endpoint is a chain of small elements, in NSM's order (sdk
//! `chains/endpoint`). NSM's generic ones come from [`nsm_api::chain`]:
//! updatepath → authorize → begin → updatetoken → timeout → monitor → trimpath; then ours
//! in [`chain`]: [`chain::mechanism`] (KERNEL, netns fd over grpcfd) →
//! [`chain::ipam`] (point-to-point) → [`chain::functions`] (the configured chain of network
//! functions, [`functions`]: [`firewall`], [`mesh_proxy`], [`vpn`]), after [`chain::service`] has turned away services we do
//! not provide. [`endpoint`] assembles it,
//! [`server`] puts it on gRPC, [`error`] turns its errors into statuses.

#![forbid(unsafe_code)]

pub mod chain;
pub mod config;
pub mod endpoint;
pub mod error;
pub mod firewall;
pub mod functions;
pub mod ipam;
pub mod mechanism;
pub mod mesh_proxy;
pub mod metrics;
pub mod netns;
pub mod own_table;
pub mod register;
pub mod server;
pub mod validate;
pub mod vpn;

pub use config::Config;
pub use endpoint::Endpoint;
pub use error::NseError;
