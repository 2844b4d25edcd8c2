use crate::netns::{NetnsError, NetnsId};

use super::spec::SpecError;

/// Why a rules operation failed. `Spec`, `Owner` and `Plan` errors are
/// returned before anything in the kernel changes.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("invalid redirect spec: {0}")]
    Spec(#[from] SpecError),
    #[error("invalid owner name {0:?}: 1-16 characters a-z, 0-9 or '_', starting with a letter")]
    Owner(String),
    /// A rule no backend can install as meant ([`super::Plan::check`]).
    #[error("invalid plan: {0}")]
    Plan(String),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A tool the backend needs (iptables-restore, ip) is not installed.
    #[error("{program} not found: install it or choose another backend")]
    ToolMissing { program: String },
    #[error("cannot run {program} in network namespace {netns}: {source}")]
    Spawn {
        program: String,
        netns: NetnsId,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed in network namespace {netns} ({status}): {stderr}")]
    Command {
        command: String,
        netns: NetnsId,
        status: String,
        stderr: String,
    },
    #[error("nftables netlink {op} in network namespace {netns}: {source}")]
    Netlink {
        op: String,
        netns: NetnsId,
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused one message of a transaction; nothing was applied.
    #[error("the kernel rejected {what} in network namespace {netns}: {source}")]
    Rejected {
        what: String,
        netns: NetnsId,
        #[source]
        source: std::io::Error,
    },
    #[error("unexpected output from {program}: {why}")]
    Parse { program: String, why: String },
    /// Apply failed part-way and what it had written was undone.
    #[error("{cause} (rolled back in network namespace {netns})")]
    RolledBack {
        netns: NetnsId,
        #[source]
        cause: Box<RulesError>,
    },
    /// Apply failed and the rollback failed too.
    #[error("{cause}; rollback also failed: {rollback}")]
    RollbackFailed {
        cause: Box<RulesError>,
        rollback: Box<RulesError>,
    },
    /// A change of the interface set's members that cannot be made that
    /// way; nothing was written.
    #[error("cannot change the interface set: {0}")]
    Membership(String),
    /// A membership change found the namespace without the plan's rules.
    #[error("{what} is missing in network namespace {netns}: apply the plan first")]
    NotApplied { what: String, netns: NetnsId },
    #[error("the {backend} backend cannot {op}")]
    Unsupported {
        backend: &'static str,
        op: &'static str,
    },
    #[error("writing rendered rules: {0}")]
    Output(#[source] std::io::Error),
}

impl RulesError {
    /// The innermost error, looking through rollback wrappers.
    pub fn root(&self) -> &RulesError {
        match self {
            RulesError::RolledBack { cause, .. } | RulesError::RollbackFailed { cause, .. } => {
                cause.root()
            }
            other => other,
        }
    }
}

pub type Result<T, E = RulesError> = std::result::Result<T, E>;
