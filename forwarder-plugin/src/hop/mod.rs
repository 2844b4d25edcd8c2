//! The forwarder hop's mechanism (no policy): a connection's veth between
//! the client's and the endpoint's namespaces, built from the endpoint's
//! returned connection, plus the client-side redirect rules the endpoint
//! asked for, applied all-or-nothing and undone completely — also after a
//! restart, from the state directory.
//!
//! * [`veth_plan`]: client end = `src_ip_addrs`/`src_routes`, endpoint end =
//!   `dst_ip_addrs`/`dst_routes`, MTU = `context.MTU` or 1500.
//! * [`client_redirect`]: `extra_context[`[`CLIENT_REDIRECT_KEY`]`]`, a JSON
//!   redirect spec, applied in the CLIENT namespace under an owner derived
//!   from the connection id ([`owner_for`]), so connections sharing a
//!   namespace keep separate tables/chains.
//! * [`client_capture`] / [`policies`]: the client's own routing — capture
//!   by intent (`extra_context[`[`CLIENT_CAPTURE_KEY`]`]`) and NSM's
//!   `PolicyRoute`s — with a mark and tables per connection (its slot).
//! * [`Hop`]: plumb / refresh / replace / unplumb, each connection recorded
//!   in its own file of the [`StateDir`]; connections plumb in parallel.

mod client_proxy;
mod client_routing;
mod connections;
pub mod dataplane;
mod error;
mod legacy_state;
mod links_cache;
mod locks;
mod record;
mod redirect;
mod registry;
pub mod state;
mod veth_plan;

pub use client_proxy::{ClientProxies, client_proxy};
pub use client_routing::{
    CLIENT_CAPTURE_KEY, ClientRouting, MAX_POLICIES, MAX_POLICY_ROUTES, MAX_SLOTS, Policy,
    TABLE_BASE, capture_table, client_capture, policies,
};
pub use connections::{Hop, HopOptions, PlumbOutcome, PlumbRequest};
pub use dataplane::Applied;
pub use error::{HopError, Result};
pub use record::{HopRecord, Session, UPGRADE_PORT_SHIFT};
pub(crate) use redirect::fnv1a64;
pub use redirect::{
    BackendName, CLIENT_PROXY_KEY, CLIENT_REDIRECT_KEY, CONTRACT_PREFIX, FEATURE_CLIENT_CAPTURE,
    FEATURE_CLIENT_PROXY, FEATURE_CLIENT_REDIRECT, FORWARDER_FEATURES_KEY, FORWARDER_PROXIES_KEY,
    announce, announce_features, announced_proxies, client_redirect, has_feature, owner_for,
};
pub use state::{CONNECTIONS_DIR, ConnectionFile, STATE_VERSION, StateDir, StateError, file_stem};
pub use veth_plan::{DEFAULT_MTU, Ends, veth_plan};
