//! The hop's Request/Close errors, and the ONE place they become gRPC
//! statuses: the client's mistakes are InvalidArgument, a next hop that is
//! down or slow Unavailable/DeadlineExceeded (its own refusals keep their
//! code), an endpoint answer that cannot be plumbed FailedPrecondition, and
//! a name another link or connection holds AlreadyExists.

use nsm_api::chain::ChainError;
use tonic::{Code, Status};

use super::client_side::ClientError;
use super::downstream::DownstreamError;
use super::route::RouteError;
use crate::hop::HopError;
use crate::link::LinkError;
use crate::netns::NetnsError;
use crate::rules::RulesError;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// NSM's generic hop elements (path, token, expiry, metadata).
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Downstream(#[from] DownstreamError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Hop(#[from] HopError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ForwardError {
    pub fn code(&self) -> Code {
        match self {
            ForwardError::Chain(e) => e.code(),
            ForwardError::Invalid(_) => Code::InvalidArgument,
            ForwardError::Client(ClientError::NoFd { .. }) => Code::InvalidArgument,
            ForwardError::Client(ClientError::Netns { source, .. }) => netns_code(source),
            ForwardError::Client(_) => Code::InvalidArgument,
            ForwardError::Downstream(e) => match e {
                DownstreamError::Call(c) => c.code(),
                DownstreamError::BadAnswer { .. } | DownstreamError::EndpointNetns { .. } => {
                    Code::FailedPrecondition
                }
            },
            ForwardError::Route(e) => e.code(),
            ForwardError::Hop(e) => hop_code(e),
            ForwardError::Internal(_) => Code::Internal,
        }
    }
}

fn netns_code(e: &NetnsError) -> Code {
    match e {
        NetnsError::NotFound { .. } => Code::FailedPrecondition,
        NetnsError::NotNetns { .. } | NetnsError::BadName(_) => Code::InvalidArgument,
        _ => Code::Internal,
    }
}

fn hop_code(e: &HopError) -> Code {
    match e {
        HopError::Missing { .. } | HopError::TproxyClash { .. } => Code::FailedPrecondition,
        HopError::Malformed { .. }
        | HopError::Redirect { .. }
        | HopError::Capture { .. }
        | HopError::Ambiguous { .. } => Code::InvalidArgument,
        HopError::SlotsExhausted { .. } => Code::ResourceExhausted,
        HopError::UnknownProxy { .. } | HopError::ProxyRefused { .. } => Code::FailedPrecondition,
        HopError::ProxyNotReady { .. } => Code::Unavailable,
        HopError::OwnNetns { .. } => Code::PermissionDenied,
        HopError::SameNetns { .. } => Code::FailedPrecondition,
        HopError::InUse { .. } => Code::AlreadyExists,
        HopError::Netns(e) => netns_code(e),
        HopError::Link(e) => match e {
            LinkError::LinkConflict { .. } | LinkError::Conflict { .. } => Code::AlreadyExists,
            LinkError::InvalidName { .. } | LinkError::InvalidRequest(_) => Code::InvalidArgument,
            LinkError::Netns(e) => netns_code(e),
            _ => Code::Internal,
        },
        HopError::Rules(e) => match e.root() {
            RulesError::Spec(_) => Code::InvalidArgument,
            RulesError::ToolMissing { .. } => Code::FailedPrecondition,
            RulesError::Netns(e) => netns_code(e),
            _ => Code::Internal,
        },
        HopError::State(_) | HopError::Task(_) => Code::Internal,
    }
}

impl From<ForwardError> for Status {
    fn from(e: ForwardError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}
