//! `forwarder-plugin serve`: the NSM forwarder hop. It speaks
//! `NetworkService` on both sides, exactly as NSM's kernel forwarder does:
//! the client's netns fd comes in with the Request, the Request goes on to
//! the next hop over a fresh grpcfd connection with an empty KERNEL
//! preference, the endpoint's netns fd comes back with the answer, and
//! [`crate::hop`] plumbs the veth (and the client-side rules) between them.

pub mod client_side;
pub mod config;
pub mod dead_clients;
pub mod downstream;
pub mod elements;
pub mod error;
pub mod forward;
pub mod proxies;
pub mod register;
pub mod route;
pub mod server;
pub mod watch;

pub use config::{ConfigError, EXIT_CONFIG, ServeArgs, ServeConfig};
pub use error::ForwardError;
pub use server::{ForwarderHop, ServeError, run};
