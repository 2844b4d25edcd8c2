//! The local demo of the mesh-proxy network service and the pieces the demo,
//! the end-to-end suite (`tests/tests/e2e_mesh_proxy.rs`) and the setup
//! benchmark share: namespaces and processes that clean up after
//! themselves, the demo's server (and its DNS) and transparent proxy, the topology
//! ([`lab`]), nsc-init runs, traffic and namespace snapshots.

#![forbid(unsafe_code)]

pub mod cancel;
pub mod direct_client;
pub mod dns;
pub mod hello_server;
pub mod inspect;
pub mod lab;
pub mod namespace;
pub mod nsc;
pub mod process;
pub mod proxy;
pub mod svid;
pub mod traffic;
pub mod transparent_proxy;
pub mod vpn_peer;
