use crate::link::LinkError;
use crate::netns::NetnsError;
use crate::rules::{CaptureError, RulesError, SpecError};

use super::state::StateError;

/// Why the hop could not plumb (or unplumb) a connection. Everything but
/// `Link`, `Rules`, `State` and `Task` is found before anything in the
/// kernel changes.
#[derive(Debug, thiserror::Error)]
pub enum HopError {
    /// The endpoint's connection lacks something a KERNEL veth needs.
    #[error("the endpoint's connection has no {what}: a KERNEL veth needs {why}")]
    Missing {
        what: &'static str,
        why: &'static str,
    },
    /// A value in the endpoint's connection does not parse.
    #[error("the endpoint's connection.context.ip_context.{field}[{index}] {value:?}: {why}")]
    Malformed {
        field: &'static str,
        index: usize,
        value: String,
        why: String,
    },
    /// The endpoint asked for client-side rules the redirect spec refuses.
    #[error("the endpoint's connection.context.extra_context[{key:?}]: {source}")]
    Redirect {
        key: &'static str,
        #[source]
        source: SpecError,
    },
    /// The endpoint asked for client-side capture the capture spec refuses.
    #[error("the endpoint's connection.context.extra_context[{key:?}]: {source}")]
    Capture {
        key: &'static str,
        #[source]
        source: CaptureError,
    },
    /// The endpoint asked for two kinds of client-side rules at once.
    #[error(
        "the endpoint's connection asks for both {a:?} and {b:?}: at most one applies to a connection"
    )]
    Ambiguous { a: &'static str, b: &'static str },
    /// A namespace the hop must never plumb into: its own (the node's).
    #[error(
        "the {end}'s network namespace {netns} is this forwarder's own: it is never plumbed into"
    )]
    OwnNetns { end: &'static str, netns: String },
    /// The client's and the endpoint's namespace are one.
    #[error("the client's and the endpoint's network namespace are the same ({netns})")]
    SameNetns { netns: String },
    /// Every slot of the client namespace is taken.
    #[error(
        "network namespace {netns} already has {max} connections with client-side routing at this hop"
    )]
    SlotsExhausted { netns: String, max: u16 },
    /// Another connection of this hop already uses the interface.
    #[error(
        "interface {name:?} in network namespace {netns} is already plumbed for connection {other}"
    )]
    InUse {
        name: String,
        netns: String,
        other: String,
    },
    /// Two TPROXY specs in one namespace need one policy route; they differ.
    #[error(
        "connection {other} already diverts TPROXY traffic in network namespace {netns} with mark {have_mark} and table {have_table}; \
         this one asks for mark {mark} and table {table} (TPROXY policy routing is per namespace)"
    )]
    TproxyClash {
        netns: String,
        other: String,
        have_mark: u32,
        have_table: u32,
        mark: u32,
        table: u32,
    },
    /// The endpoint named a proxy this hop has no definition of.
    #[error(
        "the endpoint's connection asks for client proxy {name:?}; this forwarder defines {known} (forwarder-plugin serve --proxies)"
    )]
    UnknownProxy { name: String, known: String },
    /// A client proxy makes sense only with the rules that send it traffic,
    /// and only when its own traffic is not sent back to itself.
    #[error("client proxy {name:?}: {why}")]
    ProxyRefused { name: String, why: String },
    /// The client proxy did not become ready; nothing of the connection stays.
    #[error("client proxy {name:?} in the client's namespace: {reason}")]
    ProxyNotReady { name: String, reason: String },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("client-side redirect rules: {0}")]
    Rules(#[from] RulesError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("internal error: {0}")]
    Task(String),
}

pub type Result<T, E = HopError> = std::result::Result<T, E>;
