use crate::netns::{NetnsError, NetnsId};

/// Why a link operation failed. Validation errors (`InvalidName`,
/// `InvalidRequest`) are returned before anything in the kernel changes.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("invalid interface name {name:?}: {source}")]
    InvalidName {
        name: String,
        #[source]
        source: nsm_api::mechanism::MechanismError,
    },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("interface {name:?} already exists and differs from what is asked: {why}")]
    LinkConflict { name: String, why: String },
    #[error("{what} already exists and differs from what is asked: {why}")]
    Conflict { what: String, why: String },
    #[error("interface {name:?} not found in network namespace {netns}")]
    LinkNotFound { name: String, netns: NetnsId },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("links need a tokio runtime: call from inside one")]
    NoRuntime,
    #[error("cannot open a netlink socket in network namespace {netns}: {source}")]
    Socket {
        netns: NetnsId,
        #[source]
        source: std::io::Error,
    },
    /// A plumbing failed, and undoing what it had done failed too: what is
    /// listed may be left in the namespaces.
    #[error("{cause}; undoing it failed too, so this may be left: {failures}")]
    RollbackFailed {
        cause: Box<LinkError>,
        failures: String,
    },
    /// The kernel (or the netlink transport) refused `op`.
    #[error("{op} in network namespace {netns}: {source}")]
    Kernel {
        op: String,
        netns: NetnsId,
        #[source]
        source: std::io::Error,
    },
}

impl LinkError {
    /// The errno of a kernel refusal, if that is what this is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            LinkError::Kernel { source, .. } => source.raw_os_error(),
            LinkError::RollbackFailed { cause, .. } => cause.errno(),
            _ => None,
        }
    }
}

pub type Result<T, E = LinkError> = std::result::Result<T, E>;
