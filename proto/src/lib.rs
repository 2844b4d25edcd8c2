//! The NSM API (v1.15) as tonic/prost types, plus the small wire helpers every
//! crate of this workspace needs: nsurl parsing, mechanism parameters, path
//! helpers and `inode://dev/ino` URLs. No I/O and no policy live here, except
//! [`grpcfd`]: fd passing beside gRPC is part of NSM's wire protocol.
//!
//! It also holds what every NSM hop (endpoint, forwarder) and client shares:
//! the generic server [`chain`] (updatepath, begin, updatetoken, timeout,
//! monitor, trimpath), per-RPC [`token`]s, their [`metadata`], the
//! [`monitor`] hub behind `connection.MonitorConnection`, the [`limits`] on
//! what one caller may send and hold, and Go [`duration`]s as NSM
//! configures them.

// `deny`, not `forbid`: grpcfd adopts fds received via SCM_RIGHTS (one audited `unsafe`).
#![deny(unsafe_code)]

/// `package connectioncontext`.
pub mod connectioncontext {
    tonic::include_proto!("connectioncontext");
}
/// `package connection` (Connection, Path, Mechanism, MonitorConnection).
pub mod connection {
    tonic::include_proto!("connection");
}
/// `package networkservice` (NetworkService Request/Close).
pub mod networkservice {
    tonic::include_proto!("networkservice");
}
/// `package registry` (NetworkService and NetworkServiceEndpoint registries).
pub mod registry {
    tonic::include_proto!("registry");
}

pub mod authorize;
pub mod chain;
pub mod contract;
pub mod discover;
pub mod duration;
pub mod env;
pub mod grpcfd;
pub mod inode;
pub mod limits;
pub mod listen;
pub mod logging;
pub mod mechanism;
pub mod memory;
pub mod metadata;
pub mod metrics;
pub mod monitor;
pub mod nsurl;
pub mod path;
pub mod probe;
pub mod register;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod transport;

/// gRPC service names every NSM server reports as SERVING on `grpc.health.v1.Health`.
pub const HEALTH_SERVICE_NAMES: [&str; 2] = [
    "networkservice.NetworkService",
    "connection.MonitorConnection",
];

/// Metadata keys NSM hops use to pass the per-RPC token of the caller.
pub const TOKEN_METADATA: &str = "nsm-client-token";
/// RFC 3339 (nano) expiry of [`TOKEN_METADATA`].
pub const TOKEN_EXPIRES_METADATA: &str = "nsm-client-token-expires";

/// Payload values of `Connection.payload` / `NetworkService.payload`.
pub mod payload {
    pub const IP: &str = "IP";
    pub const ETHERNET: &str = "ETHERNET";
}
