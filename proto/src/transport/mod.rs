//! The NSM transport every binary of this workspace uses, written once:
//! the [`server`] (NetworkService, MonitorConnection and Health on one
//! socket, limits, graceful stop) and the [`client`] (a fresh connection per
//! call, grpcfd, token metadata, deadlines). TLS, limits and health live
//! here and nowhere else.

pub mod client;
pub mod secure;
pub mod server;

pub use client::{Answer, CallError, Dialer, Session, Target};
pub use secure::Peer;
pub use server::{Listen, MAX_MESSAGE_SIZE, SHUTDOWN_GRACE, ServeError, serve};
