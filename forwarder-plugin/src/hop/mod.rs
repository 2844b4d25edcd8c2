//! The forwarder hop's mechanism (no policy): a connection's veth between
//! the client's and the endpoint's namespaces, built from the endpoint's
//! returned connection, plus the client-side redirect rules the endpoint
//! asked for, applied all-or-nothing and undone completely — also after a
//! restart, from the state file.
//!
//! * [`veth_plan`]: client end = `src_ip_addrs`/`src_routes`, endpoint end =
//!   `dst_ip_addrs`/`dst_routes`, MTU = `context.MTU` or 1500.
//! * [`client_redirect`]: `extra_context[`[`CLIENT_REDIRECT_KEY`]`]`, a JSON
//!   redirect spec, applied in the CLIENT namespace under an owner derived
//!   from the connection id ([`owner_for`]), so connections sharing a
//!   namespace keep separate tables/chains.
//! * [`Hop`]: plumb / refresh / replace / unplumb, recorded in [`StateFile`].

mod connections;
pub mod dataplane;
mod error;
mod record;
mod redirect;
pub mod state;
mod veth_plan;

pub use connections::{Hop, HopOptions, PlumbOutcome, PlumbRequest};
pub use dataplane::Applied;
pub use error::{HopError, Result};
pub use record::{HopRecord, Session};
pub use redirect::{BackendName, CLIENT_REDIRECT_KEY, client_redirect, owner_for};
pub use state::{STATE_FILE, STATE_VERSION, StateError, StateFile};
pub use veth_plan::{DEFAULT_MTU, Ends, veth_plan};
